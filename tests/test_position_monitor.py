"""PositionLossMonitor with a plain Trainer: recorded positions, probe, TensorBoard tags, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_selmerge.data import DataOrderSampler, IndexedDataset
from lightning_selmerge.imbalance import PositionLossMonitor

N, D = 48, 4


def make_dataset() -> IndexedDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] > 0).long()
    return IndexedDataset(TensorDataset(x, y), field_names=("x", "y"))


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
    base = make_dataset()

    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> dict:
            item = base[i]
            return {"x": item["x"], "y": item["y"]}

    sampler = DataOrderSampler(num_samples=N, seed=1)
    loader = DataLoader(Plain(), batch_size=8, sampler=sampler)
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
    expected = {"imbalance/spearman", "imbalance/mean_loss", "imbalance/train/spearman"}
    expected |= {f"imbalance/segment_{s:02d}_loss" for s in range(10)}
    assert expected <= scalars
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

    class Spy(TinyClassifier):
        in_step = False

        def training_step(self, batch, batch_idx):
            self.in_step = True
            try:
                return super().training_step(batch, batch_idx)
            finally:
                self.in_step = False

        def per_sample_loss(self, batch):
            if not self.in_step:
                modes.append((self.training, torch.is_grad_enabled()))
            return super().per_sample_loss(batch)

    model = Spy()
    make_trainer(tmp_path, PositionLossMonitor(probe_size=8), max_epochs=1).fit(
        model, DataLoader(make_dataset(), batch_size=8)
    )
    assert modes and all(m == (False, False) for m in modes)
    assert model.training  # restored


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
