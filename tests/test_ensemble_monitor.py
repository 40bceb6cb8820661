"""PositionLossMonitor inside the ensemble: per-replica positions, merged rho beside replicas'."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from ensemble_support import CheckpointThenCrash, Crash, MetricsRecorder
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_selmerge.data import DataOrderSampler, IndexedDataset
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.imbalance import PositionLossMonitor, position_loss_spearman

warnings.filterwarnings("ignore", ".*does not have many workers.*")

N, D, BATCH, K = 40, 6, 8, 2


def dataset() -> IndexedDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen)
    y = torch.randint(0, 3, (N,), generator=gen)  # random labels: memorisation
    return IndexedDataset(TensorDataset(x, y), field_names=("x", "y"))


class Classifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(D, 3)
        self.trained: list[tuple[list[int], int]] = []  # (samples, replica) of every batch

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        logits = self.layer(batch["x"])
        return torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        strategy = self.trainer.strategy  # switched to the batch's replica by now
        self.trained.append((batch["sample_index"].tolist(), strategy.active_replica))
        losses = self.per_sample_loss(batch)
        return {"loss": losses.mean(), "sample_loss": losses.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def run(epochs: int, tmp: Path | None = None, ckpt_path: str | None = None, merge: bool = True):
    monitor = PositionLossMonitor(num_segments=4, probe_size=32, probe_batch_size=16)
    merger = SelectionMergeCallback(seed=1) if merge else None
    callbacks: list = [monitor] if merger is None else [monitor, merger]
    if tmp is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=3, save_top_k=-1))
    trainer = fit_ensemble(callbacks, epochs, ckpt_path, enable_checkpointing=tmp is not None)
    return trainer, monitor, merger


def fit_ensemble(
    callbacks: list,
    epochs: int,
    ckpt_path: str | None = None,
    module: LightningModule | None = None,
    val: bool = False,
    **kwargs,
) -> Trainer:
    """A K-replica fit of a Classifier (or ``module``) on the dataset (no logger unless given;
    with ``val``, validated on it every epoch)."""
    settings = {"logger": False, "enable_checkpointing": False, **kwargs}
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=K, seed=3),
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )
    val_loader = DataLoader(dataset(), batch_size=16) if val else None
    train_loader = DataLoader(dataset(), batch_size=BATCH)
    trainer.fit(module or Classifier(), train_loader, val_loader, ckpt_path=ckpt_path)
    return trainer


def test_probe_scores_each_replica_and_the_merge() -> None:
    trainer, monitor, merge = run(epochs=1)
    orders = DataOrderSampler(num_samples=N, seed=3)
    for replica in range(K):
        assert torch.equal(monitor.first_positions_of(replica), orders.positions(0, replica))
    metrics = trainer.callback_metrics
    strategy = trainer.strategy
    data = dataset()
    indices = monitor.probe.indices
    batch = {key: torch.stack([data[int(i)][key] for i in indices]) for key in ("x", "y")}
    probe = Classifier()
    cases = [(f"replica_{k}", strategy.replica_state(k).module, k) for k in range(K)]
    cases.append(("merged", merge.merged_state, 0))
    for name, state, replica in cases:
        probe.load_state_dict(state)
        with torch.no_grad():
            losses = probe.per_sample_loss(batch)
        positions = orders.positions(0, replica)[indices]
        expected = position_loss_spearman(positions, losses)
        assert float(metrics[f"imbalance/{name}/spearman"]) == pytest.approx(expected, abs=1e-5)
    assert "imbalance/spearman" not in metrics  # the live module is not probed on its own


def test_positions_survive_a_resume_inside_the_first_epoch(tmp_path: Path) -> None:
    _, full, _ = run(epochs=1, tmp=tmp_path)
    (ckpt,) = tmp_path.glob("*-step=6.ckpt")  # replica 0 done, replica 1 on its second batch
    _, resumed, _ = run(epochs=1, ckpt_path=str(ckpt))
    for replica in range(K):
        assert torch.equal(resumed.first_positions_of(replica), full.first_positions_of(replica))


def test_monitor_alone_attributes_each_batch_to_its_replica() -> None:
    """No merge callback: the strategy itself tells the monitor who trains each batch."""
    trainer, monitor, _ = run(epochs=2, merge=False)
    module = trainer.lightning_module
    rows = monitor.records.table()
    done = 0
    for samples, replica in module.trained:  # every batch under the replica that trained it
        assert rows["sample"][done : done + len(samples)].tolist() == samples
        assert rows["replica"][done : done + len(samples)].tolist() == [replica] * len(samples)
        done += len(samples)
    assert done == rows["sample"].numel() == 2 * K * N
    orders = DataOrderSampler(num_samples=N, seed=3)
    for epoch in (0, 1):
        for replica in range(K):
            mine = monitor.records.table(epoch=epoch, replica=replica)
            assert torch.equal(mine["sample"], orders.order(epoch, replica))
            assert mine["position"].tolist() == list(range(N))
    for replica in range(K):
        assert torch.equal(monitor.first_positions_of(replica), orders.positions(0, replica))
    names = {name for name in trainer.callback_metrics if name.startswith("imbalance/")}
    assert {name.split("/")[1] for name in names} == {f"replica_{k}" for k in range(K)}

    # beside a merge callback: the same records and the same replica results, plus the merge
    with_merge, merged_monitor, _ = run(epochs=2)
    for column, values in merged_monitor.records.table().items():
        assert torch.equal(values, rows[column]), column
    for name in names:
        assert float(with_merge.callback_metrics[name]) == float(trainer.callback_metrics[name])
    assert "imbalance/merged/spearman" in with_merge.callback_metrics


def test_the_merge_is_probed_at_the_epochs_that_merged_and_the_last_one() -> None:
    """every_n_epochs=2 over 3 epochs: merges at epoch 1 and (the fit ends there) epoch 2, each
    probed once; an earlier merge is not logged as a later epoch's, and the final merge is
    made at the last batch like the others, so it is probed too."""
    recorder = MetricsRecorder()
    monitor = PositionLossMonitor(num_segments=4, probe_size=32, probe_batch_size=16)
    merger = SelectionMergeCallback(seed=1, every_n_epochs=2)
    fit_ensemble([monitor, merger], 3, logger=recorder)
    steps_per_epoch = K * N // BATCH
    merged = [step for step, m in recorder.logged if "imbalance/merged/spearman" in m]
    replica = [step for step, m in recorder.logged if "imbalance/replica_0/spearman" in m]
    assert replica == [steps_per_epoch * (e + 1) for e in range(3)]
    assert merged == replica[1:]  # epochs 1 and 2 merged; epoch 0 did not
    data = dataset()
    batch = {
        key: torch.stack([data[int(i)][key] for i in monitor.probe.indices]) for key in ("x", "y")
    }
    probe = Classifier()
    probe.load_state_dict(merger.merged_state)  # the final merge, the model the fit ends with
    with torch.no_grad():
        losses = probe.per_sample_loss(batch)
    positions = DataOrderSampler(num_samples=N, seed=3).positions(0, 0)[monitor.probe.indices]
    last = next(m for _, m in reversed(recorder.logged) if "imbalance/merged/spearman" in m)
    expected = position_loss_spearman(positions, losses)
    assert last["imbalance/merged/spearman"] == pytest.approx(expected, abs=1e-5)


def test_a_monitor_added_at_a_resume_knows_every_replicas_positions(tmp_path: Path) -> None:
    """Epoch 0 trained without a monitor: the sampler tells every replica's first-epoch order
    (only replica 0's was known, so the other replicas were not probed)."""

    def fit(callbacks: list, epochs: int, ckpt_path: str | None = None) -> Trainer:
        callbacks = [SelectionMergeCallback(seed=1), *callbacks]
        checkpointing = ckpt_path is None
        return fit_ensemble(
            callbacks,
            epochs,
            ckpt_path,
            enable_checkpointing=checkpointing,
            default_root_dir=tmp_path,
        )

    fit([], epochs=1)
    (ckpt,) = tmp_path.rglob("*.ckpt")
    monitor = PositionLossMonitor(num_segments=4, probe_size=32, probe_batch_size=16)
    trainer = fit([monitor], epochs=2, ckpt_path=str(ckpt))
    orders = DataOrderSampler(num_samples=N, seed=3)
    for replica in range(K):
        assert torch.equal(monitor.first_positions_of(replica), orders.positions(0, replica))
        assert f"imbalance/replica_{replica}/spearman" in trainer.callback_metrics


class ValidatedClassifier(Classifier):
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.per_sample_loss(batch).mean())


EPOCH_STEPS = K * N // BATCH  # 10 training steps an epoch


def fit_logged(
    ckpt_path: str | None = None, callbacks: list | None = None, **kwargs
) -> tuple[Trainer, MetricsRecorder]:
    """2 epochs, the merge validated and probed each epoch, every scalar recorded."""
    recorder = MetricsRecorder()
    monitor = PositionLossMonitor(num_segments=4, probe_size=32, probe_batch_size=16)
    callbacks = [monitor, SelectionMergeCallback(seed=1), *(callbacks or [])]
    trainer = fit_ensemble(
        callbacks,
        2,
        ckpt_path,
        module=ValidatedClassifier(),
        val=True,
        logger=recorder,
        num_sanity_val_steps=0,
        **kwargs,
    )
    return trainer, recorder


def epoch_scalars(recorder: MetricsRecorder, since: int = 0) -> dict[tuple[int, str], float]:
    """The callbacks' epoch-level scalars logged from step ``since`` on: the probe's
    (``imbalance/...``) and each replica's epoch training loss, by (step, name)."""
    return {
        (step, name): value
        for step, metrics in recorder.logged
        if step >= since
        for name, value in metrics.items()
        if name.startswith("imbalance/") or name.endswith("/train_loss")
    }


@pytest.fixture(scope="module")
def logged_fit() -> tuple[Trainer, MetricsRecorder]:
    return fit_logged()


@pytest.mark.parametrize(
    "crash_at",
    [
        EPOCH_STEPS // 2,  # inside epoch 0 (replica 0 done)
        EPOCH_STEPS,  # epoch 0's last batch: before its validation, merge probe and first positions
        2 * EPOCH_STEPS,  # the last epoch's last batch: the resumed fit trains no batch
    ],
)
def test_a_fit_resumed_from_a_checkpoint_at_any_batch_logs_every_epoch_end(
    logged_fit, tmp_path: Path, crash_at: int
) -> None:
    """A checkpoint saved at a training batch, the process dying right after it, the fit resumed
    from it: the same final merge, bit for bit, and the same epoch-level scalars of the callbacks.

    At an epoch's last batch the checkpoint is saved after that epoch's merge but before its
    end, and Lightning resumes it with the next epoch (no on_train_epoch_end for it): the
    callbacks catch up with the epoch's end themselves (its probe, its replicas' training
    losses, the first-epoch positions)."""
    full, full_log = logged_fit
    crash = CheckpointThenCrash(
        crash_at, dirpath=tmp_path, every_n_train_steps=crash_at, filename="{step}"
    )
    with pytest.raises(Crash):
        fit_logged(callbacks=[crash], enable_checkpointing=True)
    resumed, resumed_log = fit_logged(ckpt_path=str(tmp_path / f"step={crash_at}.ckpt"))
    assert resumed.global_step == full.global_step == 2 * EPOCH_STEPS
    final, expected = resumed.lightning_module.state_dict(), full.lightning_module.state_dict()
    assert set(final) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    # Lightning logs an epoch's metrics at its last batch's step, the probe at the step after
    want = epoch_scalars(full_log, since=crash_at - 1)
    assert {name for _, name in want} >= {"replica_0/train_loss", "imbalance/merged/spearman"}
    assert epoch_scalars(resumed_log) == want
