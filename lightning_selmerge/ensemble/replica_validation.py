"""Validate a module's current weights outside Lightning's loop, capturing what it logs.

Used to score each replica next to the merged model: ``validation_step`` runs as in the
validation loop (same loaders, batch limits, device transfer and precision), and the values it
passes to ``self.log`` are reduced per epoch the way Lightning reduces them, without touching
Lightning's own results. On several ranks a ``torchmetrics`` metric is synced over the ranks
that validate the same replica (its shard ranks), not over every rank: the other replica groups
hold other replicas.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import DataLoader
from torchmetrics import Metric

__all__ = ["validate_current_weights"]

_REDUCTIONS = ("mean", "sum", "max", "min")


class _Captured:
    """One logged name's values over an epoch."""

    def __init__(self, reduce_fx: str) -> None:
        self.reduce_fx = reduce_fx
        self.total = 0.0
        self.weight = 0
        self.best = math.nan
        self.metric: Metric | None = None

    def add(self, value: float, batch_size: int) -> None:
        if self.reduce_fx == "mean":
            self.total += value * batch_size
            self.weight += batch_size
        elif self.reduce_fx == "sum":
            self.total += value
        else:
            pick = max if self.reduce_fx == "max" else min
            self.best = value if math.isnan(self.best) else pick(self.best, value)

    def result(self, group: Any = None) -> float:
        """The epoch's value; a metric synced over ``group`` (the default: its own setting)."""
        if self.metric is not None:
            kept = self.metric.process_group
            if group is not None:
                self.metric.process_group = group
            try:
                value = float(self.metric.compute())
            finally:
                self.metric.process_group = kept
            self.metric.reset()
            return value
        if self.reduce_fx == "mean":
            return self.total / self.weight if self.weight else math.nan
        return self.total if self.reduce_fx == "sum" else self.best


def _reduce_name(reduce_fx: Any) -> str:
    name = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "")
    name = {"avg": "mean"}.get(name, name)
    if name not in _REDUCTIONS:
        raise ValueError(
            f"replica validation reduces logged values with one of {_REDUCTIONS}, got "
            f"reduce_fx={reduce_fx!r}; use one of those or SelectionMergeCallback("
            "validate_replicas=False)."
        )
    return name


def _iterable(loader: Any) -> Iterable[Any]:
    """The loader itself, or a worker-less twin when persistent workers are mid-epoch."""
    if isinstance(loader, DataLoader) and loader.persistent_workers:
        if loader.batch_sampler is not None:
            return DataLoader(
                loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn
            )
        return DataLoader(
            loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn
        )
    return loader


def validate_current_weights(trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
    """Run ``validation_step`` over the trainer's val loaders and return the epoch values it logged.

    The module's ``on_validation_epoch_start`` and ``on_validation_epoch_end`` run before and
    after the batches, and what they log is captured too. Names get Lightning's
    ``/dataloader_idx_{i}`` suffix when there are several loaders. ``torchmetrics`` objects passed
    to ``self.log`` are computed (synced over the replica's shard ranks) and reset.
    """
    loaders = trainer.val_dataloaders
    if loaders is None:
        return {}
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    limits = trainer.num_val_batches
    several = len(loaders) > 1
    captured: dict[str, _Captured] = {}
    signature = inspect.signature(pl_module.log)
    current: dict[str, Any] = {}

    def capture(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arg = bound.arguments
        name, value = arg["name"], arg["value"]
        if several and arg["add_dataloader_idx"] and current.get("idx") is not None:
            name = f"{name}/dataloader_idx_{current['idx']}"
        entry = captured.setdefault(name, _Captured(_reduce_name(arg["reduce_fx"])))
        if isinstance(value, Metric):
            entry.metric = value
            return
        batch = current.get("batch")
        size = arg["batch_size"] or (extract_batch_size(batch) if batch is not None else 1)
        entry.add(float(torch.as_tensor(value).detach().float().mean()), int(size))

    pl_module.log = capture  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            # the module's epoch hooks frame the pass, as in the loop: state a module gathers in
            # validation_step and reduces (and logs) at epoch end stays this pass's own
            pl_module.on_validation_epoch_start()
            for idx, loader in enumerate(loaders):
                limit = limits[idx] if idx < len(limits) else math.inf
                for batch_idx, batch in enumerate(_iterable(loader)):
                    if batch_idx >= limit:
                        break
                    batch = trainer.precision_plugin.convert_input(batch)
                    batch = pl_module.on_before_batch_transfer(batch, idx)
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
                    current.update(idx=idx, batch=batch)
                    step_args = (batch, batch_idx, idx) if several else (batch, batch_idx)
                    trainer.strategy.validation_step(*step_args)
            current.update(idx=None, batch=None)  # epoch-end logs belong to no batch or loader
            pl_module.on_validation_epoch_end()
    finally:
        del pl_module.log
    group = _replica_ranks(trainer)
    return {name: entry.result(group) for name, entry in captured.items()}


def _replica_ranks(trainer: Trainer) -> Any:
    """The process group of the ranks validating this rank's replica (its shard ranks), or
    ``None`` outside a device mesh."""
    strategy = trainer.strategy
    mesh = (
        getattr(strategy, "device_mesh", None)
        if getattr(strategy, "is_distributed", False)
        else None
    )
    return None if mesh is None else mesh["shard"].get_group()
