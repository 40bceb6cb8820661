"""PositionLossMonitor with a plain Trainer: recorded positions, probe, TensorBoard tags, errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_selmerge.data import DataOrderSampler, IndexedDataset
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler
from lightning_selmerge.imbalance import (
    PositionLossMonitor,
    ProbeTarget,
    position_loss_spearman,
    segment_means,
)

N, D = 48, 4


def make_dataset() -> IndexedDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] > 0).long()
    return IndexedDataset(TensorDataset(x, y), field_names=("x", "y"))


class Unindexed(torch.utils.data.Dataset):
    """The same samples as :func:`make_dataset`, without the ``sample_index`` key."""

    def __init__(self) -> None:
        self.base = make_dataset()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        return {"x": item["x"], "y": item["y"]}


class TinyClassifier(LightningModule):
    def __init__(self, return_sample_loss: bool = True) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(D, 2)
        self.return_sample_loss = return_sample_loss
        self.seen: list[tuple[int, list[int]]] = []  # (epoch, sample indices) per training_step

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            self.layer(batch["x"]), batch["y"], reduction="none"
        )

    def training_step(self, batch: dict, batch_idx: int):
        if "sample_index" in batch:
            self.seen.append((self.current_epoch, batch["sample_index"].tolist()))
        sample_loss = self.per_sample_loss(batch)
        if self.return_sample_loss:
            return {"loss": sample_loss.mean(), "sample_loss": sample_loss.detach()}
        return sample_loss.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ProbeAware(TinyClassifier):
    """Tells a probe's ``per_sample_loss`` calls (``probing``) from the training step's."""

    in_step = False

    @property
    def probing(self) -> bool:
        return not self.in_step

    def training_step(self, batch: dict, batch_idx: int):
        self.in_step = True
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self.in_step = False


class NoPerSampleLoss(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(D, 2)

    def training_step(self, batch: dict, batch_idx: int):
        return torch.nn.functional.cross_entropy(self.layer(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(
    tmp_path: Path, monitor: PositionLossMonitor, max_epochs: int = 2, **kw
) -> Trainer:
    kw.setdefault("logger", TensorBoardLogger(tmp_path))
    kw.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_recorded_positions_match_indices_seen_by_training_step(
    tmp_path: Path, num_workers: int
) -> None:
    model = TinyClassifier()
    monitor = PositionLossMonitor(probe_size=32, probe_batch_size=16, num_segments=4)
    loader = DataLoader(make_dataset(), batch_size=5, shuffle=True, num_workers=num_workers)
    make_trainer(tmp_path, monitor).fit(model, loader)

    for epoch in (0, 1):
        seen = [i for e, idx in model.seen if e == epoch for i in idx]
        rows = monitor.records.table(epoch=epoch)
        assert rows["sample"].tolist() == seen
        assert rows["position"].tolist() == list(range(len(seen)))
        assert torch.isfinite(rows["loss"]).all()
    first = [i for e, idx in model.seen if e == 0 for i in idx]
    expected = torch.full((N,), -1)
    expected[torch.tensor(first)] = torch.arange(len(first))
    assert torch.equal(monitor.first_positions, expected)
    # the two epochs had different (shuffled) orders, positions stay those of epoch 0
    assert first != [i for e, idx in model.seen if e == 1 for i in idx]
    assert monitor.probe is not None and len(monitor.probe) == 32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_positions_agree_with_data_order_sampler(tmp_path: Path, num_workers: int) -> None:
    data = make_dataset()
    sampler = DataOrderSampler(data, seed=7, replica=2)
    loader = DataLoader(data, batch_size=6, sampler=sampler, num_workers=num_workers)
    model = TinyClassifier()
    monitor = PositionLossMonitor(probe_size=16, probe_batch_size=8)
    make_trainer(tmp_path, monitor).fit(model, loader)
    assert torch.equal(monitor.first_positions, sampler.positions(epoch=0, replica=2))
    rows = monitor.records.table(epoch=1)
    assert torch.equal(rows["sample"], sampler.order(epoch=1, replica=2))  # set_epoch was called
    assert set(rows["replica"].tolist()) == {2}


def test_sample_indices_from_sampler_when_batch_has_none(tmp_path: Path) -> None:
    sampler = DataOrderSampler(num_samples=N, seed=1)
    loader = DataLoader(Unindexed(), batch_size=8, sampler=sampler)
    model = TinyClassifier(return_sample_loss=False)
    monitor = PositionLossMonitor(probe_size=8)
    make_trainer(tmp_path, monitor, max_epochs=1).fit(model, loader)
    assert torch.equal(monitor.records.table(epoch=0)["sample"], sampler.order(epoch=0))
    assert torch.equal(monitor.first_positions, sampler.positions(epoch=0))


def test_tensorboard_event_file_has_tags(tmp_path: Path) -> None:
    model = TinyClassifier()
    monitor = PositionLossMonitor(probe_size=40, probe_batch_size=16, num_segments=10)
    loader = DataLoader(make_dataset(), batch_size=8, shuffle=True)
    trainer = make_trainer(tmp_path, monitor, max_epochs=2)
    trainer.fit(model, loader)

    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {"imbalance/spearman", "imbalance/mean_loss"}
    expected |= {f"imbalance/segment_{s:02d}_loss" for s in range(10)}
    assert expected == {tag for tag in scalars if tag.startswith("imbalance/")}
    assert len(acc.Scalars("imbalance/spearman")) == 2  # one per epoch
    assert "imbalance/loss_by_position" in acc.Tags()["images"]
    assert -1.0 <= float(trainer.callback_metrics["imbalance/spearman"]) <= 1.0


def test_named_curves_for_other_models(tmp_path: Path) -> None:
    model = TinyClassifier()
    monitor = PositionLossMonitor(probe_size=24)
    loader = DataLoader(make_dataset(), batch_size=8, shuffle=True)
    trainer = make_trainer(tmp_path, monitor, max_epochs=1)
    trainer.fit(model, loader)

    other = TinyClassifier()
    merged = monitor.evaluate_probe(model, name="merged")
    replica = monitor.evaluate_probe(other, name="replica_0")
    assert torch.equal(merged.indices, replica.indices)
    assert not torch.allclose(merged.losses, replica.losses)
    logged = monitor.log_results(trainer, [merged, replica], figure_tag="imbalance/merge_curves")
    assert "imbalance/merged/spearman" in logged and "imbalance/replica_0/segment_09_loss" in logged
    trainer.logger.experiment.flush()
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "imbalance/merged/spearman" in acc.Tags()["scalars"]
    assert "imbalance/merge_curves" in acc.Tags()["images"]


def test_probe_evaluates_in_eval_mode_without_grad(tmp_path: Path) -> None:
    modes: list[tuple[bool, bool]] = []

    class Spy(ProbeAware):
        def per_sample_loss(self, batch):
            if self.probing:
                modes.append((self.training, torch.is_grad_enabled()))
            return super().per_sample_loss(batch)

    model = Spy()
    make_trainer(tmp_path, PositionLossMonitor(probe_size=8), max_epochs=1).fit(
        model, DataLoader(make_dataset(), batch_size=8)
    )
    assert modes and all(m == (False, False) for m in modes)
    assert model.training  # restored


def test_probe_restores_each_submodules_mode(tmp_path: Path) -> None:
    """A submodule the module keeps in eval mode while training (a frozen BatchNorm) stays so
    after a probe, as after Lightning's validation (the probe set every submodule to train)."""
    modes: list[bool] = []

    class FrozenNorm(ProbeAware):
        def setup(self, stage: str) -> None:
            self.norm = torch.nn.BatchNorm1d(1).eval()

        def training_step(self, batch, batch_idx):
            modes.append(self.norm.training)
            return super().training_step(batch, batch_idx)

    make_trainer(tmp_path, PositionLossMonitor(probe_size=8), max_epochs=2).fit(
        FrozenNorm(), DataLoader(make_dataset(), batch_size=8)
    )
    assert modes and not any(modes)


def test_probe_runs_in_validations_precision(tmp_path: Path) -> None:
    """bf16-mixed: the probe scores the model under the same autocast as validation (it ran
    in float32, so its losses were not the ones validation would report)."""
    autocast: list[tuple[bool, torch.dtype]] = []

    class Spy(ProbeAware):
        def per_sample_loss(self, batch):
            if self.probing:
                autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().per_sample_loss(batch).float()

    trainer = make_trainer(
        tmp_path, PositionLossMonitor(probe_size=8), max_epochs=1, precision="bf16-mixed"
    )
    trainer.fit(Spy(), DataLoader(make_dataset(), batch_size=8))
    assert autocast and all(a == (True, torch.bfloat16) for a in autocast)


def test_other_logger_gets_scalars_only(tmp_path: Path) -> None:
    model = TinyClassifier()
    monitor = PositionLossMonitor(probe_size=16)
    trainer = make_trainer(tmp_path, monitor, max_epochs=1, logger=CSVLogger(tmp_path))
    trainer.fit(model, DataLoader(make_dataset(), batch_size=8))
    text = Path(trainer.logger.log_dir, "metrics.csv").read_text()
    assert "imbalance/spearman" in text and "imbalance/segment_00_loss" in text


def test_missing_per_sample_loss_raises_clear_error(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, PositionLossMonitor(), max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"per_sample_loss.*sample_loss"):
        trainer.fit(NoPerSampleLoss(), DataLoader(make_dataset(), batch_size=8))


def test_probe_size_zero_needs_sample_loss_from_training_step(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, PositionLossMonitor(probe_size=0), max_epochs=1)
    with pytest.raises(MisconfigurationException, match="sample_loss"):
        trainer.fit(NoPerSampleLoss(), DataLoader(make_dataset(), batch_size=8))


def test_probe_size_zero_bins_training_losses(tmp_path: Path) -> None:
    monitor = PositionLossMonitor(probe_size=0, num_segments=4)
    trainer = make_trainer(tmp_path, monitor, max_epochs=2)
    trainer.fit(TinyClassifier(), DataLoader(make_dataset(), batch_size=8, shuffle=True))
    assert monitor.probe is None
    assert "imbalance/segment_03_loss" in trainer.callback_metrics


def test_batches_without_indices_and_plain_sampler_raise(tmp_path: Path) -> None:
    x = torch.randn(N, D)
    y = (x[:, 0] > 0).long()
    plain = [{"x": x[i], "y": y[i]} for i in range(N)]
    trainer = make_trainer(tmp_path, PositionLossMonitor(probe_size=4), max_epochs=1)
    with pytest.raises(MisconfigurationException, match="IndexedDataset"):
        trainer.fit(TinyClassifier(), DataLoader(plain, batch_size=8, shuffle=True))


@pytest.mark.parametrize("split", ["subset", "random_split"])
def test_sample_indices_of_a_wrapped_dataset_are_refused(tmp_path: Path, split: str) -> None:
    """Subset(IndexedDataset(data)) carries the full dataset's indices, which the probe would
    read from the subset: silently other samples (Subset), or an index error (random_split)."""
    full = make_dataset()
    gen = torch.Generator().manual_seed(1)
    if split == "subset":
        train = torch.utils.data.Subset(full, torch.randperm(32, generator=gen).tolist())
    else:
        train = torch.utils.data.random_split(full, [32, N - 32], generator=gen)[1]
    trainer = make_trainer(tmp_path, PositionLossMonitor(probe_size=8), max_epochs=1)
    with pytest.raises(MisconfigurationException, match="wrap the outermost dataset"):
        trainer.fit(TinyClassifier(), DataLoader(train, batch_size=8, shuffle=True))


def test_state_dict_restores_first_epoch_positions(tmp_path: Path) -> None:
    model = TinyClassifier()
    monitor = PositionLossMonitor(probe_size=16)
    trainer = make_trainer(tmp_path, monitor, max_epochs=1, enable_checkpointing=True)
    loader = DataLoader(make_dataset(), batch_size=8, shuffle=True)
    trainer.fit(model, loader)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = PositionLossMonitor(probe_size=16)
    trainer2 = make_trainer(tmp_path, resumed, max_epochs=2)
    trainer2.fit(TinyClassifier(), loader, ckpt_path=ckpt)
    assert torch.equal(resumed.first_positions, monitor.first_positions)
    assert set(resumed.records.table()["epoch"].tolist()) == {0, 1}
    assert resumed.probe is not None


@pytest.mark.parametrize("indexed", [True, False])
def test_a_mid_epoch_resume_with_a_loader_that_restarts_counts_the_epoch_again(
    tmp_path: Path, indexed: bool
) -> None:
    """A plain DataLoader is not resumed inside an epoch: Lightning feeds it from the epoch's
    start again. The monitor counts positions from there (it went on from the checkpoint's
    count: positions past the data, and for batches without sample_index, samples that never
    trained)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = make_dataset() if indexed else Unindexed()
    sampler = DataOrderSampler(num_samples=N, seed=3)
    loader = DataLoader(data, batch_size=8, sampler=sampler)  # 6 batches
    checkpoints = ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp_path, PositionLossMonitor(probe_size=8), max_epochs=1,
                           enable_checkpointing=True)  # fmt: skip
    trainer.callbacks.append(checkpoints)
    trainer.fit(TinyClassifier(return_sample_loss=False), loader)
    resumed = PositionLossMonitor(probe_size=8)
    trainer = make_trainer(tmp_path, resumed, max_epochs=1)
    with pytest.warns(UserWarning, match="starts the epoch again"):
        trainer.fit(TinyClassifier(), loader, ckpt_path=str(tmp_path / "step=2.ckpt"))
    rows = resumed.records.table(epoch=0)
    order = sampler.order(epoch=0)
    trained = rows["sample"].numel()  # the batches Lightning ran after the checkpoint
    assert trained == 4 * 8
    assert torch.equal(rows["sample"], order[:trained])  # what the loader fed
    assert torch.equal(rows["position"], torch.arange(trained))


def test_a_resume_at_an_epochs_last_batch_ends_that_epoch_and_starts_the_next(
    tmp_path: Path,
) -> None:
    """A checkpoint at epoch 0's last batch, the fit dying right after it: Lightning resumes with
    epoch 1 and calls neither epoch 0's on_train_epoch_end nor epoch 1's on_train_epoch_start.
    The monitor ends epoch 0 (first-epoch positions, probe, log) and counts epoch 1's positions
    from 0, as the uninterrupted fit."""
    from ensemble_support import CheckpointThenCrash, Crash, MetricsRecorder

    sampler = DataOrderSampler(num_samples=N, seed=3)
    loader = DataLoader(make_dataset(), batch_size=8, sampler=sampler)  # 6 batches an epoch

    def fit(ckpt_path: str | None = None, crash: bool = False):
        monitor, recorder = PositionLossMonitor(probe_size=16, num_segments=4), MetricsRecorder()
        callbacks = [CheckpointThenCrash(6, dirpath=tmp_path, filename="{step}",
                                         every_n_train_steps=6)] if crash else []  # fmt: skip
        trainer = make_trainer(tmp_path, monitor, logger=recorder, enable_checkpointing=crash)
        trainer.callbacks.extend(callbacks)
        torch.manual_seed(0)  # the same initial weights (a resume loads the checkpoint's)
        trainer.fit(TinyClassifier(), loader, ckpt_path=ckpt_path)
        return monitor, recorder

    full, full_log = fit()
    with pytest.raises(Crash):
        fit(crash=True)
    resumed, resumed_log = fit(ckpt_path=str(tmp_path / "step=6.ckpt"))
    for column, values in full.records.table().items():
        assert torch.equal(resumed.records.table()[column], values), column
    assert torch.equal(resumed.first_positions, full.first_positions)

    def imbalance(log: MetricsRecorder) -> dict[tuple[int, str], float]:
        return {
            (step, name): value
            for step, metrics in log.logged
            for name, value in metrics.items()
            if name.startswith("imbalance/")
        }

    assert imbalance(resumed_log) == imbalance(full_log)
    assert {step for step, _ in imbalance(full_log)} == {6, 12}


# -- ensemble mode: K replicas one after another in each epoch --------------------------------
def ensemble_setup(
    dataset: torch.utils.data.Dataset, batch_size: int = 5, **monitor_kw
) -> tuple[DataLoader, DataOrderSampler, PositionLossMonitor]:
    """A loader running 2 replicas' orders back to back, and a monitor told the replica split."""
    orders = DataOrderSampler(num_samples=N, seed=3)
    batches = EnsembleBatchSampler(orders, num_replicas=2, batch_size=batch_size)
    monitor = PositionLossMonitor(**monitor_kw)
    monitor.replica_of = lambda batch_idx: batch_idx // batches.batches_per_replica
    return DataLoader(dataset, batch_sampler=batches), orders, monitor


@pytest.mark.parametrize("indexed", [True, False], ids=["sample_index", "sampler_fallback"])
def test_ensemble_positions_count_per_replica(tmp_path: Path, indexed: bool) -> None:
    dataset = make_dataset() if indexed else Unindexed()
    # probe_size=0: the training losses are binned  (48 = 9*5 + 3 samples per replica)
    loader, orders, monitor = ensemble_setup(dataset, probe_size=0)
    trainer = make_trainer(tmp_path, monitor, max_epochs=2)
    trainer.fit(TinyClassifier(), loader)

    for epoch in (0, 1):
        for k in (0, 1):
            rows = monitor.records.table(epoch=epoch, replica=k)
            assert torch.equal(rows["sample"], orders.order(epoch=epoch, replica=k))
            assert rows["position"].tolist() == list(range(N))  # restarts for every replica
    for k in (0, 1):
        assert torch.equal(monitor.first_positions_of(k), orders.positions(epoch=0, replica=k))
    assert torch.equal(monitor.first_positions, orders.positions(epoch=0, replica=0))
    assert not torch.equal(monitor.first_positions_of(0), monitor.first_positions_of(1))
    with pytest.raises(KeyError, match="replica 2"):
        monitor.first_positions_of(2)

    # training losses: each row binned by its own replica's first-epoch positions
    rows = monitor.records.table(epoch=1)
    own = torch.stack([orders.positions(0, 0), orders.positions(0, 1)])[
        rows["replica"], rows["sample"]
    ]
    primary_only = orders.positions(0, 0)[rows["sample"]]
    expected = position_loss_spearman(own, rows["loss"])
    assert float(trainer.callback_metrics["imbalance/spearman"]) == pytest.approx(
        expected, abs=1e-6
    )
    assert expected != pytest.approx(position_loss_spearman(primary_only, rows["loss"]), abs=1e-6)


def test_probe_targets_load_bin_by_replica_and_restore_live_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model_a, model_b = TinyClassifier(), TinyClassifier()
    state_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    state_b = {k: v.clone() for k, v in model_b.state_dict().items()}
    loader, orders, monitor = ensemble_setup(make_dataset(), probe_size=32, num_segments=4)
    live_before: dict[str, torch.Tensor] = {}

    def targets(trainer: Trainer, module: LightningModule) -> list[ProbeTarget]:
        live_before.update({k: v.clone() for k, v in module.state_dict().items()})
        return [
            ProbeTarget("merged", state_a),
            ProbeTarget("live", None),  # after other weights were loaded: still the live ones
            ProbeTarget("replica_1", state_b, replica=1),
        ]

    monitor.probe_targets = targets
    model = TinyClassifier()
    trainer = make_trainer(tmp_path, monitor, max_epochs=1)
    trainer.fit(model, loader)

    # the live weights are back, bit for bit, and differ from both targets
    assert live_before and all(
        torch.equal(v, live_before[k]) for k, v in model.state_dict().items()
    )
    assert not torch.equal(live_before["layer.weight"], state_a["layer.weight"])
    assert not torch.equal(live_before["layer.weight"], state_b["layer.weight"])

    trainer.logger.experiment.flush()
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {f"imbalance/{n}/spearman" for n in ("merged", "replica_1", "live")} <= scalars
    assert "imbalance/spearman" not in scalars  # the live module is not probed under ""
    assert acc.Tags()["images"] == ["imbalance/loss_by_position"]

    # each target's losses come from its own weights, binned by its replica's positions
    probe = monitor.probe
    assert probe is not None
    metrics = trainer.callback_metrics
    for name, weights, replica in (("merged", model_a, 0), ("replica_1", model_b, 1)):
        losses = probe.evaluate(weights)
        positions = orders.positions(epoch=0, replica=replica)[probe.indices]
        means, _ = segment_means(positions, losses, num_segments=4, num_positions=N)
        spearman = position_loss_spearman(positions, losses)
        assert float(metrics[f"imbalance/{name}/spearman"]) == pytest.approx(spearman, abs=1e-6)
        for s in range(4):
            logged = float(metrics[f"imbalance/{name}/segment_{s:02d}_loss"])
            assert logged == pytest.approx(float(means[s]), abs=1e-6, nan_ok=True)
    other = orders.positions(epoch=0, replica=0)[probe.indices]
    assert float(metrics["imbalance/replica_1/spearman"]) != pytest.approx(
        position_loss_spearman(other, probe.evaluate(model_b)), abs=1e-6
    )
    live_loss = float(probe.evaluate(model).mean())
    assert float(metrics["imbalance/live/mean_loss"]) == pytest.approx(live_loss, abs=1e-6)

    direct = monitor.evaluate_probe(model_b, name="b", replica=1)
    assert torch.equal(direct.positions, orders.positions(epoch=0, replica=1)[probe.indices])
    assert torch.equal(
        monitor.evaluate_probe(model_b).positions, monitor.first_positions[probe.indices]
    )


def test_probe_targets_restore_live_weights_on_error(tmp_path: Path) -> None:
    loader, _, monitor = ensemble_setup(make_dataset(), probe_size=8)
    live_before: dict[str, torch.Tensor] = {}

    def targets(trainer: Trainer, module: LightningModule) -> list[ProbeTarget]:
        live_before.update({k: v.clone() for k, v in module.state_dict().items()})
        zeros = {k: torch.zeros_like(v) for k, v in live_before.items()}
        return [ProbeTarget("zeros", zeros), ProbeTarget("broken", {"layer.weight": zeros})]

    monitor.probe_targets = targets
    model = TinyClassifier()
    with pytest.raises(RuntimeError, match="state_dict"):
        make_trainer(tmp_path, monitor, max_epochs=1).fit(model, loader)
    assert live_before and all(
        torch.equal(v, live_before[k]) for k, v in model.state_dict().items()
    )
    assert bool(live_before["layer.weight"].any())  # the zero weights did not stay loaded


def test_state_dict_round_trip_keeps_per_replica_positions(tmp_path: Path) -> None:
    loader, orders, monitor = ensemble_setup(make_dataset(), probe_size=8)
    make_trainer(tmp_path, monitor, max_epochs=1, logger=False).fit(TinyClassifier(), loader)
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = PositionLossMonitor()
    restored.load_state_dict(state)
    for k in (0, 1):
        assert torch.equal(restored.first_positions_of(k), orders.positions(epoch=0, replica=k))
    assert torch.equal(restored.first_positions, orders.positions(epoch=0, replica=0))
    assert restored.num_positions == N

    # a state dict saved before per-replica positions: its one replica is the recorded one
    single = PositionLossMonitor()
    rows = monitor.records.table(epoch=0, replica=1)
    single.records.add(rows["sample"], rows["position"], epoch=0, replica=1)
    old = {
        "records": single.records.state_dict(),
        "first_positions": state["replica_positions"][1],
        "num_positions": N,
    }
    legacy = PositionLossMonitor()
    legacy.load_state_dict(old)
    assert torch.equal(legacy.first_positions_of(1), orders.positions(epoch=0, replica=1))
    assert torch.equal(legacy.first_positions, orders.positions(epoch=0, replica=1))
    with pytest.raises(KeyError):
        legacy.first_positions_of(0)


def test_probe_batches_go_through_the_modules_transfer_hooks(tmp_path: Path) -> None:
    """Probe batches reach the device as training batches do (a GPU run once crashed on a
    ``BatchEncoding`` that a hand-written move skipped): via the strategy and the module's
    ``transfer_batch_to_device``."""
    probed: list[bool] = []

    class Hooked(ProbeAware):
        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return {**super().transfer_batch_to_device(batch, device, dataloader_idx), "moved": 1}

        def per_sample_loss(self, batch):
            if self.probing:
                probed.append(batch.get("moved") == 1)
            return super().per_sample_loss(batch)

    make_trainer(tmp_path, PositionLossMonitor(probe_size=8), max_epochs=1).fit(
        Hooked(), DataLoader(make_dataset(), batch_size=8)
    )
    assert probed and all(probed)


def test_probe_moves_batches_with_a_to_method_outside_a_trainer(monkeypatch) -> None:
    """Unattached modules get Lightning's ``move_data_to_device``: objects with ``.to`` (such as
    transformers' ``BatchEncoding``) are moved, not passed through."""
    from transformers import BatchEncoding

    from lightning_selmerge.imbalance import PositionProbe

    seen: list[type] = []

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(D, 2)

        def per_sample_loss(self, batch):
            seen.append(type(batch))
            return torch.nn.functional.cross_entropy(
                self.layer(batch["x"]), batch["y"], reduction="none"
            )

    def collate(items):
        return BatchEncoding(torch.utils.data.default_collate(items))

    calls: list[torch.device] = []
    original = BatchEncoding.to

    def spy(self, device, *args, **kwargs):
        calls.append(torch.device(device))
        return original(self, device, *args, **kwargs)

    monkeypatch.setattr(BatchEncoding, "to", spy)
    probe = PositionProbe(make_dataset(), indices=range(10), batch_size=4, collate_fn=collate)
    losses = probe.evaluate(Plain())
    assert losses.shape == (10,)
    assert seen == [BatchEncoding] * 3 and calls == [torch.device("cpu")] * 3
