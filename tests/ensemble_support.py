"""Shared by the ensemble tests: a tiny regression module and a one-call ensemble fit."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_selmerge.ensemble import DataOrderEnsemble

N, BATCH = 60, 8  # 8 batches per replica, the last one partial (4 samples)


def child_env(*paths: Path) -> dict[str, str]:
    """This process's environment for a child Python, with ``paths`` put before its
    ``PYTHONPATH`` (kept: packages installed there must stay importable in the child)."""
    kept = [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), *kept])}


def flat(lists: Iterable[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def make_data(n: int = N) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=gen)
    return TensorDataset(torch.arange(n), x, y[:, None])


class Net(LightningModule):
    def __init__(self, scheduler: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1)
        )
        self.scheduler = scheduler
        self.seen: list[tuple[int, int, list[int]]] = []  # (epoch, batch_idx, sample indices)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch_idx, batch[0].tolist()))
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> dict | torch.optim.Optimizer:
        opt = torch.optim.Adam(self.parameters(), lr=0.05)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def ensemble_trainer(
    strategy: DataOrderEnsemble, callbacks: list[Callback] | None = None, **trainer_kwargs
) -> Trainer:
    """A quiet one-CPU Trainer for ``strategy`` (1 epoch, no logger, checkpoints or sanity
    validation unless ``trainer_kwargs`` say otherwise)."""
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        **trainer_kwargs,
    }
    return Trainer(strategy=strategy, callbacks=callbacks or [], **settings)


def fit(
    module: Net,
    k: int,
    epochs: int = 1,
    callbacks: list[Callback] | None = None,
    val: bool = False,
    strategy: DataOrderEnsemble | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs,
) -> tuple[Trainer, DataOrderEnsemble]:
    strategy = strategy or DataOrderEnsemble(num_replicas=k, seed=3)
    trainer = ensemble_trainer(strategy, callbacks, max_epochs=epochs, **trainer_kwargs)
    data = make_data()
    train = DataLoader(data, batch_size=BATCH, shuffle=True)
    val_loader = DataLoader(data, batch_size=30) if val else None
    trainer.fit(module, train, val_loader, ckpt_path=ckpt_path)
    return trainer, strategy


class MetricsRecorder(Logger):
    """Every (step, metrics) the trainer logs."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((int(step or 0), dict(metrics)))


class Crash(Exception):
    """The process dying right after a checkpoint was written."""


class CheckpointThenCrash(ModelCheckpoint):
    """Saves every ``every_n_train_steps`` steps; the fit dies right after the save at step
    ``crash_at`` (nothing after it runs: not the epoch's validation, nor its end)."""

    def __init__(self, crash_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        super().on_train_batch_end(trainer, *args)
        if trainer.global_step == self.crash_at:
            raise Crash
