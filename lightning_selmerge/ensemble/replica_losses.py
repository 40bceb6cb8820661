"""Each replica's training loss, as :class:`~lightning_selmerge.ensemble.SelectionMergeCallback`
logs it: ``replica_{k}/train_loss_step`` every ``log_every_n_steps`` steps and
``replica_{k}/train_loss`` per epoch, with the running sums carried through checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_selmerge.ensemble.strategy import DataOrderEnsemble

__all__ = ["ReplicaLosses"]


class ReplicaLosses:
    """Running per-replica loss sums of one fit and their logs.

    Straight to the loggers, not through ``self.log``: a name given to ``self.log`` keeps being
    logged at later steps after its replica stopped training, and a fit resumed from a
    checkpoint at an epoch's last batch logs that epoch's means outside its epoch (Lightning
    goes on with the next one). On several ranks, one small all_reduce per log.

    Example:
        >>> losses = ReplicaLosses()
        >>> losses.sums.shape
        torch.Size([0, 2])
    """

    def __init__(self) -> None:
        self.sums = torch.zeros(0, 2, dtype=torch.float64)  # per replica: sum, count
        self._step_sums = torch.zeros_like(self.sums)  # since the last step-level log
        self._step_logged = -1  # the step of the last step-level log
        #: Lightning's logging step of the latest training batch (an epoch's metrics go there)
        self.log_step = 0

    def start(self, trainer: Trainer, num_replicas: int) -> None:
        """Zero sums for ``num_replicas`` replicas at the start of a fit."""
        self.sums = torch.zeros(num_replicas, 2, dtype=torch.float64)
        self._step_sums = torch.zeros_like(self.sums)
        self._step_logged = trainer.global_step

    def add(
        self,
        trainer: Trainer,
        strategy: DataOrderEnsemble,
        replica: int,
        value: float,
        size: int,
    ) -> None:
        """Count a batch of ``size`` examples with mean loss ``value`` for ``replica``; every
        ``log_every_n_steps`` optimizer steps, log ``replica_{k}/train_loss_step``, the mean
        loss of replica k's batches since the last log, for each replica trained then."""
        self.sums[replica] += torch.tensor([value * size, size], dtype=torch.float64)
        self._step_sums[replica] += torch.tensor([value * size, size], dtype=torch.float64)
        step = trainer.global_step
        if step == self._step_logged or step % max(trainer.log_every_n_steps, 1):
            return
        self._step_logged = step
        _log_means(trainer, strategy, self._step_sums, "train_loss_step", step)

    def log_epoch(self, trainer: Trainer, strategy: DataOrderEnsemble) -> None:
        """Log ``replica_{k}/train_loss``, the mean loss of each replica that trained in the
        epoch, at the step Lightning logs the epoch's metrics at (its last batch's)."""
        metrics = _log_means(trainer, strategy, self.sums, "train_loss", self.log_step)
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)

    def state_dict(self) -> dict[str, Any]:
        return {"step_logged": self._step_logged}

    def save(self, strategy: DataOrderEnsemble, state: dict[str, Any]) -> None:
        """Put every rank's sums in ``state`` (a collective on several ranks, as the save is)."""
        if self.sums.numel():  # a fit's
            state["loss_sums"] = _every_rank(strategy, self.sums)
            state["step_sums"] = _every_rank(strategy, self._step_sums)

    def restore(self, strategy: DataOrderEnsemble, state: dict[str, Any]) -> None:
        """Go on with a checkpoint's sums (this rank's; absent in older checkpoints)."""
        sums = state.get("loss_sums")  # [ranks, replicas, 2]
        if sums is not None and tuple(sums.shape[1:]) == tuple(self.sums.shape):
            self.sums = sums[strategy.global_rank].clone()
            self._step_sums = state["step_sums"][strategy.global_rank].clone()
            self._step_logged = int(state["step_logged"])


def _log_means(
    trainer: Trainer, strategy: DataOrderEnsemble, sums: torch.Tensor, name: str, step: int
) -> dict[str, float]:
    """Log ``replica_{k}/{name}`` of each replica with a count in ``sums`` (summed over ranks:
    the replicas sit on many), zero ``sums``, and return what was logged."""
    totals = strategy.sum_over_ranks(sums).tolist()
    sums.zero_()
    metrics = {
        f"replica_{k}/{name}": total / count for k, (total, count) in enumerate(totals) if count
    }
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
    return metrics


def _every_rank(strategy: DataOrderEnsemble, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank, stacked by global rank (a collective on several ranks)."""
    if not strategy.is_distributed:
        return tensor.clone()[None]
    return strategy.all_gather(tensor.to(strategy.root_device)).cpu()
