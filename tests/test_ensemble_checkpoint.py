"""Checkpoints, exact resume, offload, sync and replica validation of the sequential ensemble."""

from __future__ import annotations

import gc
import tempfile
import uuid
import warnings
from pathlib import Path

import fsspec
import pytest
import torch
from ensemble_support import Net, ensemble_trainer, fit, make_data
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_selmerge.ensemble import CHECKPOINT_KEY, DataOrderEnsemble, SelectionMergeCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")

K, EPOCHS = 3, 3  # 8 batches per replica: 24 steps per epoch


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


class SpanNet(Net):
    """A per-replica schedule spanning the fit, its length from ``steps_per_replica()`` in
    ``configure_optimizers`` as the docs advise (which sets the train loader up before Lightning
    has read a checkpoint's position in the epoch)."""

    def configure_optimizers(self) -> dict:
        opt = torch.optim.Adam(self.parameters(), lr=0.05)
        total = self.trainer.strategy.steps_per_replica()
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run(
    tmp: Path | None = None, ckpt_path: str | None = None, span: bool = False, **strategy_kwargs
):
    """K=3, 3 epochs, dropout (so the RNG matters), step scheduler, resample merge, validation."""
    module = SpanNet(dropout=0.2) if span else Net(scheduler=True, dropout=0.2)
    callbacks: list[Callback] = [SelectionMergeCallback(resample=1, seed=7)]
    kwargs = {}
    if tmp is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=5, save_top_k=-1))
        kwargs["enable_checkpointing"] = True
    strategy = DataOrderEnsemble(num_replicas=K, seed=3, **strategy_kwargs)
    trainer, strategy = fit(
        module, K, EPOCHS, callbacks, val=True, strategy=strategy, ckpt_path=ckpt_path, **kwargs
    )
    return module, trainer, strategy


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ckpts")
    module, _, strategy = run(tmp)
    return tmp, module.state_dict(), strategy.replica_states()


@pytest.mark.parametrize(
    "step",
    [
        5,  # epoch 0, inside replica 0
        20,  # epoch 0, inside replica 2 (replicas 0 and 1 done)
        40,  # epoch 1, replica 1 just done: the next batch switches (after a merge + val)
        45,  # epoch 1, inside replica 2
        60,  # epoch 2, inside replica 1
    ],
)
def test_resume_mid_epoch_is_bit_identical(uninterrupted, step: int) -> None:
    tmp, final, replicas = uninterrupted
    (ckpt,) = tmp.glob(f"*-step={step}.ckpt")
    module, trainer, strategy = run(ckpt_path=str(ckpt))
    assert trainer.global_step == EPOCHS * 24
    assert_same(module.state_dict(), final)  # the final merge, bit for bit
    for got, want in zip(strategy.replica_states(), replicas):
        assert_same(got, want)


@pytest.fixture(scope="module")
def uninterrupted_span(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("span_ckpts")
    module, _, _ = run(tmp, span=True)
    return tmp, module.state_dict()


@pytest.mark.parametrize("step", [20, 45])
def test_resume_mid_epoch_is_exact_when_configure_optimizers_reads_the_loader(
    uninterrupted_span, step: int
) -> None:
    tmp, final = uninterrupted_span
    (ckpt,) = tmp.glob(f"*-step={step}.ckpt")
    module, trainer, _ = run(ckpt_path=str(ckpt), span=True)
    assert trainer.global_step == EPOCHS * 24
    assert_same(module.state_dict(), final)


def test_checkpoint_state_dict_is_the_merged_model(uninterrupted) -> None:
    tmp, _, _ = uninterrupted
    ckpt = torch.load(tmp / "epoch=1-step=45.ckpt", weights_only=False)  # inside replica 2
    saved = ckpt[CHECKPOINT_KEY]
    assert saved["num_replicas"] == K and saved["active"] == 2
    assert len(saved["replicas"]) == K and saved["live"] is not None
    # state_dict holds the epoch-0 merge (the latest one), not the live replica
    merged = ckpt["state_dict"]
    assert not torch.equal(merged["net.0.weight"], saved["live"]["net.0.weight"])
    loaded = Net.load_from_checkpoint(tmp / "epoch=1-step=45.ckpt", dropout=0.2)
    assert_same(loaded.state_dict(), merged)
    # before the first merge there is nothing to swap: state_dict is the live module
    early = torch.load(tmp / "epoch=0-step=5.ckpt", weights_only=False)
    assert_same(early["state_dict"], early[CHECKPOINT_KEY]["live"])


def test_resuming_a_finished_fit_leaves_the_merge_in_the_module(tmp_path: Path) -> None:
    """``ckpt_path="last"`` of a fit that already ran all its epochs (a rerun job): Lightning
    trains nothing, and the module must hold the merge, as after the fit that saved it (it was
    left holding the live replica, loaded to go on training)."""
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # saved at validation's end
    module = Net(dropout=0.2)
    fit(module, 2, 2, [SelectionMergeCallback(), last], val=True, enable_checkpointing=True)
    final = module.state_dict()
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert_same(saved["state_dict"], final)
    assert not torch.equal(saved[CHECKPOINT_KEY]["live"]["net.0.weight"], final["net.0.weight"])
    rerun = Net(dropout=0.2)
    trainer, _ = fit(
        rerun, 2, 2, [SelectionMergeCallback()], val=True, ckpt_path=str(last.last_model_path)
    )
    assert trainer.global_step == 32  # nothing left to train
    assert_same(rerun.state_dict(), final)


class StopInFirstEpoch(Callback):
    """Stops the fit after its second training batch, inside replica 0 of epoch 0."""

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:  # type: ignore[no-untyped-def]
        trainer.should_stop = trainer.global_step == 2


class SanityNet(Net):
    """Records the weights its sanity-check validation sees."""

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            self.sanity_weights = {n: t.detach().clone() for n, t in self.state_dict().items()}
        super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("rerun", [False, True])
def test_a_reused_callback_starts_each_fit_without_the_last_merge(
    tmp_path: Path, rerun: bool
) -> None:
    """One SelectionMergeCallback for several fits: the last fit's merge stayed in it (after a
    resume of a finished fit, which trains nothing, also as "restored from the checkpoint"), so
    the next fit's sanity check validated that merge and, stopped before its first merge, the
    fit ended holding it instead of its own weights at fit start."""
    merge, last = SelectionMergeCallback(), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(Net(), 2, 1, [merge, last], val=True, enable_checkpointing=True)
    if rerun:  # nothing left to train
        fit(Net(), 2, 1, [merge], val=True, ckpt_path=str(last.last_model_path))
    module = SanityNet()
    initial = {n: t.clone() for n, t in module.state_dict().items()}
    with pytest.warns(UserWarning, match="no epoch was completed"):
        fit(module, 2, 1, [merge, StopInFirstEpoch()], val=True, num_sanity_val_steps=1)
    assert merge.merged_state is None
    assert_same(module.sanity_weights, initial)
    assert_same(module.state_dict(), initial)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_replicas": 2, "seed": 3}, r"num_replicas=3 but this strategy has num_replicas=2"),
        ({"num_replicas": 3, "seed": 4}, r"seed=3 but this strategy has seed=4"),
        ({"num_replicas": 3, "seed": 3, "fixed_batches": True}, r"fixed_batches=False"),
    ],
)
def test_resume_with_another_ensemble_is_refused(uninterrupted, kwargs, match) -> None:
    tmp, _, _ = uninterrupted
    ckpt = next(tmp.glob("*-step=20.ckpt"))
    strategy = DataOrderEnsemble(**kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        fit(Net(scheduler=True, dropout=0.2), 2, EPOCHS, strategy=strategy, ckpt_path=str(ckpt))


def test_disk_offload_gives_the_same_run(uninterrupted, tmp_path: Path) -> None:
    _, final, replicas = uninterrupted
    module, _, strategy = run(offload="disk", offload_dir=str(tmp_path), pin_memory=True)
    assert_same(module.state_dict(), final)
    for got, want in zip(strategy.replica_states(), replicas):
        assert_same(got, want)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"replica_{k}.{ext}" for k in range(K) for ext in ("pt", "safetensors")]


def test_sync_replicas_resets_every_replica_to_the_merge() -> None:
    merge = SelectionMergeCallback(sync_replicas=True, seed=1)
    module = Net()
    _, strategy = fit(module, K, 1, [merge])
    for state in strategy.replica_states():
        assert_same(state, merge.merged_state)
    assert_same(module.state_dict(), merge.merged_state)


def test_replicas_are_validated_beside_the_merge() -> None:
    module = Net()
    trainer, strategy = fit(module, 2, 1, [SelectionMergeCallback(seed=2)], val=True)
    metrics = trainer.callback_metrics
    _, x, y = make_data().tensors
    expected = []
    for state in strategy.replica_states():
        probe = Net()
        probe.load_state_dict(state)
        with torch.no_grad():  # two val batches of 30, mean of the batch means
            losses = [
                torch.nn.functional.mse_loss(probe.net(x[s]), y[s])
                for s in (slice(0, 30), slice(30, 60))
            ]
        expected.append(float(sum(losses) / 2))
    for replica, value in enumerate(expected):
        assert float(metrics[f"replica_{replica}/val_loss"]) == pytest.approx(value, rel=1e-6)
    assert float(metrics["replica_mean/val_loss"]) == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert float(metrics["val_loss"]) not in expected  # the merged model's, not a replica's
    assert trainer.progress_bar_metrics["replica"] == 1.0


class PlainModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[1]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_export_needs_a_hugging_face_model(tmp_path: Path) -> None:
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=2),
        callbacks=[SelectionMergeCallback(save_dir=str(tmp_path))],
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
    )
    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    with pytest.raises(MisconfigurationException, match="PreTrainedModel"):
        trainer.fit(PlainModule(), loader)
    assert list(tmp_path.iterdir()) == []


class TwoLoaderNet(Net):
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:  # type: ignore[override]
        self.log("val_loss", self.loss(batch))


def test_replicas_are_validated_on_several_validation_loaders() -> None:
    trainer = ensemble_trainer(
        DataOrderEnsemble(num_replicas=2, seed=3),
        [SelectionMergeCallback(seed=2)],
        limit_train_batches=2,
    )
    data = make_data()
    loaders = [torch.utils.data.DataLoader(data, batch_size=b) for b in (30, 20)]
    trainer.fit(TwoLoaderNet(), torch.utils.data.DataLoader(data, batch_size=8), loaders)
    metrics = trainer.callback_metrics
    for i in (0, 1):
        values = [float(metrics[f"replica_{k}/val_loss/dataloader_idx_{i}"]) for k in (0, 1)]
        mean = float(metrics[f"replica_mean/val_loss/dataloader_idx_{i}"])
        assert mean == pytest.approx(sum(values) / 2, rel=1e-6)
    assert "val_loss/dataloader_idx_1" in metrics


def test_checkpoint_to_a_remote_path_is_written_and_resumed() -> None:
    fs = fsspec.filesystem("memory")
    url = f"memory://ckpts-{uuid.uuid4().hex}/ensemble.ckpt"
    merge = SelectionMergeCallback(seed=1)
    trainer, _ = fit(Net(), 2, 1, [merge], limit_train_batches=2)
    trainer.save_checkpoint(url)
    try:
        with fsspec.open(url, "rb") as handle:
            saved = torch.load(handle, weights_only=False)
        assert saved[CHECKPOINT_KEY]["num_replicas"] == 2
        assert_same(saved["state_dict"], merge.merged_state)
        _, resumed = fit(
            Net(), 2, 2, [SelectionMergeCallback(seed=1)], ckpt_path=url, limit_train_batches=2
        )
    finally:
        if fs.exists(url.split("/")[2]):
            fs.rm(url.split("/")[2], recursive=True)
    _, straight = fit(Net(), 2, 2, [SelectionMergeCallback(seed=1)], limit_train_batches=2)
    for got, want in zip(resumed.replica_states(), straight.replica_states()):
        assert_same(got, want)


def test_a_remote_path_for_per_rank_files_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written, not even under ./s3:
    strategy = DataOrderEnsemble(num_replicas=2, parallel_devices=[torch.device("cpu")] * 2)
    assert strategy.is_distributed
    with pytest.raises(MisconfigurationException, match=r"'s3://bucket/run/last.ckpt'.*local"):
        strategy.save_checkpoint({"state_dict": {}}, "s3://bucket/run/last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_offload_directory_is_removed_with_the_strategy(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    strategy = DataOrderEnsemble(num_replicas=2, seed=3, offload="disk")
    trainer = fit(Net(), 2, 1, [SelectionMergeCallback()], strategy=strategy)[0]
    (directory,) = tmp_path.glob("selmerge-replicas-*")
    assert len(strategy.replica_states()) == 2  # still readable after the fit
    assert sorted(p.name for p in directory.iterdir())[0] == "replica_0.pt"
    del trainer, strategy
    gc.collect()
    assert not directory.exists()


def test_validating_before_the_first_merge_is_named() -> None:
    """every_n_epochs=2 with validation every epoch: epoch 0's metrics are a replica's."""
    with pytest.warns(UserWarning, match="validating in epoch 0, before the first merge"):
        fit(Net(), 2, 2, [SelectionMergeCallback(every_n_epochs=2)], val=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Net(), 2, 2, [SelectionMergeCallback()], val=True)
    assert not [w for w in caught if "before the first merge" in str(w.message)]


def test_the_last_epoch_is_known_only_from_a_bound() -> None:
    """The final merge is made at the last batch of the last epoch: max_epochs or max_steps
    tell it; an unbounded fit (max_epochs=-1, e.g. with max_time) merges every n-th epoch only."""
    from types import SimpleNamespace

    from lightning_selmerge.ensemble.callback import _fit_ends_here

    def trainer(**kw) -> SimpleNamespace:
        return SimpleNamespace(**{"max_epochs": -1, "max_steps": -1, "global_step": 8, **kw})

    assert not _fit_ends_here(trainer(current_epoch=4))
    assert not _fit_ends_here(trainer(current_epoch=4, max_epochs=None))
    assert _fit_ends_here(trainer(current_epoch=2, max_epochs=3))
    assert not _fit_ends_here(trainer(current_epoch=1, max_epochs=3))
    assert _fit_ends_here(trainer(current_epoch=1, max_steps=8))
