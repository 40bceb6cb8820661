"""hf.optim's schedule length under DataOrderEnsemble: the optimizer steps of ONE replica."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from ensemble_support import Net, fit
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from test_device_groups import run_distributed

from lightning_selmerge.ensemble import SelectionMergeCallback
from lightning_selmerge.hf.optim import adamw_with_warmup, steps_per_model

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class LinearNet(Net):
    def configure_optimizers(self) -> dict:  # type: ignore[override]
        self.total = steps_per_model(self)
        return adamw_with_warmup(self, 0.05, 0.0, warmup_steps=2, lr_schedule="linear")


class LastLR(Callback):
    """The learning rate after each replica's last optimizer step of every epoch."""

    def __init__(self) -> None:
        self.lrs: dict[tuple[int, int], float] = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        strategy = trainer.strategy
        if (batch_idx + 1) % strategy.batches_per_replica == 0:  # type: ignore[attr-defined]
            key = (trainer.current_epoch, strategy.replica_of(batch_idx))  # type: ignore[attr-defined]
            self.lrs[key] = trainer.optimizers[0].param_groups[0]["lr"]


def test_linear_schedule_ends_at_zero_with_each_replicas_last_step() -> None:
    """K=3, 8 batches per replica; accumulation 1 in epoch 0, 2 in epoch 1: 8 + 4 steps."""
    module, last = LinearNet(), LastLR()
    callbacks = [SelectionMergeCallback(), GradientAccumulationScheduler({0: 1, 1: 2}), last]
    trainer, strategy = fit(module, 3, epochs=2, callbacks=callbacks)
    assert module.total == strategy.steps_per_replica() == 12
    assert trainer.global_step == 3 * 12
    for replica in range(3):
        assert last.lrs[(0, replica)] == pytest.approx(0.05 * (12 - 8) / (12 - 2))
        assert last.lrs[(1, replica)] == 0.0


def test_steps_per_model_counts_one_replica_on_replica_groups(tmp_path: Path) -> None:
    """K=4 on 2 ranks (2 replica groups of 2 replicas), 8 batches per replica, 2 epochs."""
    result = run_distributed(tmp_path, 2, 4, 1, 8, "--record-steps")
    for rank in result["ranks"]:
        assert rank["steps"] == {"steps_per_replica": 16, "steps_per_model": 16}


class LongWarmupNet(Net):
    def configure_optimizers(self) -> dict:  # type: ignore[override]
        return adamw_with_warmup(self, 0.05, 0.0, warmup_steps=50, lr_schedule="cosine")


def test_a_warmup_longer_than_a_replicas_steps_is_warned_of() -> None:
    """warmup_steps counts one replica's steps (16 here): 50 never reach the peak rate."""
    with pytest.warns(UserWarning, match=r"warmup_steps=50 is not below the 16 optimizer steps"):
        fit(LongWarmupNet(), 3, epochs=2, callbacks=[SelectionMergeCallback()])
