"""AdamW with decoupled weight decay on matrices only, and an optional warmup schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from transformers import get_scheduler

__all__ = ["LR_SCHEDULES", "adamw_with_warmup", "decay_groups"]

#: accepted ``lr_schedule`` names (Hugging Face ``get_scheduler`` names).
LR_SCHEDULES = ("constant", "linear", "cosine")


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: matrices decay, vectors (biases, norm weights) do not.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        >>> [len(g["params"]) for g in decay_groups(net, 0.1)]
        [1, 3]
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def check_schedule(owner: str, lr_schedule: str, warmup_steps: int) -> None:
    """Raise on an unknown schedule name or a negative warmup."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"{owner}: lr_schedule={lr_schedule!r} is not one of {LR_SCHEDULES}.")
    if warmup_steps < 0:
        raise ValueError(f"{owner}: warmup_steps={warmup_steps} must be >= 0.")


def steps_per_model(module: LightningModule) -> int:
    """Optimizer steps each trained model takes over the fit.

    The trainer's estimate; under :class:`~lightning_selmerge.ensemble.DataOrderEnsemble` the
    steps of one replica (``strategy.steps_per_replica()``: the trainer's estimate counts every
    replica a rank trains, ``K / R`` of them on R replica groups).
    """
    trainer = module.trainer
    per_replica = getattr(trainer.strategy, "steps_per_replica", None)
    total = per_replica() if callable(per_replica) else trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            "lr_schedule='linear'/'cosine' decays over the training's length, but the trainer "
            "has no bound (max_epochs=-1 and max_steps=-1); set max_steps or max_epochs, or use "
            "lr_schedule='constant'."
        )
    return max(1, int(total))


def adamw_with_warmup(
    module: LightningModule,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    lr_schedule: str = "constant",
) -> Any:
    """AdamW over :func:`decay_groups`, with a step-interval schedule unless it is flat.

    ``"constant"`` warms up linearly for ``warmup_steps`` then stays (no scheduler at all when
    ``warmup_steps == 0``); ``"linear"`` and ``"cosine"`` warm up, then decay to 0 at the end of
    training. Under :class:`~lightning_selmerge.ensemble.DataOrderEnsemble` each replica has its
    own schedule, so the decay spans one replica's steps (:func:`steps_per_model`).
    """
    optimizer = torch.optim.AdamW(decay_groups(module, weight_decay), lr=learning_rate)
    if lr_schedule == "constant" and warmup_steps == 0:
        return optimizer
    try:
        steps: int | None = steps_per_model(module)
    except (ValueError, RuntimeError):  # unbounded, or no trainer: only a decay needs the length
        if lr_schedule != "constant":
            raise
        steps = None
    if steps is not None and warmup_steps >= steps:
        rank_zero_warn(
            f"{type(module).__name__}: warmup_steps={warmup_steps} is not below the {steps} "
            "optimizer steps each model trains: the learning rate never reaches its peak"
            + (" (nor decays)" if lr_schedule != "constant" else "")
            + "; lower warmup_steps."
        )
    if lr_schedule == "constant":
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    else:
        scheduler = get_scheduler(
            lr_schedule,
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=steps,
        )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }
