"""``SelectionMergeCallback``: merge the ensemble's replicas each epoch and validate the merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_selmerge.ensemble.strategy import DataOrderEnsemble, cpu_state_copy
from lightning_selmerge.merging import MergeRule, make_method, merge_state_dicts

__all__ = ["SelectionMergeCallback"]


class SelectionMergeCallback(Callback):
    """Merge the :class:`DataOrderEnsemble` replicas at the end of each epoch's training.

    At fit start it captures the base (pre-trained) weights. At the last training batch of every
    ``every_n_epochs``-th epoch (after the last replica's step) it merges the K replicas'
    floating-point tensors with the merge core (non-float tensors are copied from the last
    replica) into :attr:`merged_state`. Like Lightning's ``WeightAveraging``, the merged weights
    are swapped into the module for validation and swapped out afterwards, so **the validation
    metrics logged during fit are the merged model's**, under the module's own names. At the end
    of fit the module holds the merged weights. It also logs ``replica_{k}/train_loss`` (epoch
    mean of the ``loss`` returned by ``training_step`` on replica k's batches).

    Args:
        method: ``"selection"`` (parameter selection) or ``"average"`` (weighted average).
        resample: selection's resample count (needs the base weights, captured for you).
        weights: per-replica weights for ``"average"``.
        probabilities: per-replica probabilities for ``"selection"``.
        seed: the merge's random seed.
        every_n_epochs: merge every this many epochs (and always at the end of fit).
        rules: per-tensor method overrides, first match wins.
        log_replica_loss: log ``replica_{k}/train_loss``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_selmerge.ensemble import DataOrderEnsemble
        >>> trainer = Trainer(strategy=DataOrderEnsemble(num_replicas=4),
        ...                   callbacks=[SelectionMergeCallback(resample=1)],
        ...                   accelerator="cpu", devices=1, logger=False)
    """

    def __init__(
        self,
        method: str = "selection",
        resample: int = 0,
        weights: Sequence[float] | None = None,
        probabilities: Sequence[float] | None = None,
        seed: int = 0,
        every_n_epochs: int = 1,
        rules: Sequence[MergeRule] = (),
        log_replica_loss: bool = True,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(
                f"SelectionMergeCallback: every_n_epochs must be >= 1, got {every_n_epochs}."
            )
        self.method = make_method(
            method, weights=weights, probabilities=probabilities, resample=resample
        )
        self.seed = int(seed)
        self.every_n_epochs = int(every_n_epochs)
        self.rules = tuple(rules)
        self.log_replica_loss = log_replica_loss
        self.base_state: dict[str, torch.Tensor] | None = None
        self.merged_state: dict[str, torch.Tensor] | None = None
        self._merged_step = -1
        self._live_state: dict[str, torch.Tensor] | None = None

    # -- merging --------------------------------------------------------------------------
    def merge(self, strategy: DataOrderEnsemble) -> dict[str, torch.Tensor]:
        """Merge the strategy's current replica states with this callback's method."""
        replicas = strategy.replica_states()
        floats = [n for n, t in replicas[0].items() if t.is_floating_point()]
        merged = merge_state_dicts(
            [{n: r[n] for n in floats} for r in replicas],
            base=None if self.base_state is None else {n: self.base_state[n] for n in floats},
            method=self.method,
            rules=self.rules,
            seed=self.seed,
        )
        last = replicas[-1]
        return {n: merged[n] if n in merged else last[n].clone() for n in last}

    def _merge_now(self, trainer: Trainer) -> None:
        self.merged_state = self.merge(_ensemble(trainer))
        self._merged_step = trainer.global_step

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            _ensemble(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.base_state = cpu_state_copy(pl_module.state_dict())
        self.merged_state = None
        self._merged_step = -1

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        strategy = _ensemble(trainer)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.log_replica_loss and isinstance(loss, torch.Tensor):
            replica = strategy.replica_of(batch_idx)
            pl_module.log(
                f"replica_{replica}/train_loss", loss.detach(), on_step=False, on_epoch=True
            )
        last_batch = batch_idx == trainer.num_training_batches - 1
        if last_batch and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._merge_now(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.merged_state is None or trainer.state.fn != TrainerFn.FITTING:
            return
        self._live_state = cpu_state_copy(pl_module.state_dict())
        pl_module.load_state_dict(self.merged_state)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._live_state is not None:
            pl_module.load_state_dict(self._live_state)
            self._live_state = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = _ensemble(trainer)
        if self.merged_state is None or self._merged_step != trainer.global_step:
            self._merge_now(trainer)  # fallback: max_steps, early stopping, every_n_epochs
        strategy.release_live()
        assert self.merged_state is not None
        pl_module.load_state_dict(self.merged_state)


def _ensemble(trainer: Trainer) -> DataOrderEnsemble:
    strategy = trainer.strategy
    if not isinstance(strategy, DataOrderEnsemble):
        raise MisconfigurationException(
            "SelectionMergeCallback needs Trainer(strategy=DataOrderEnsemble(num_replicas=K)), "
            f"got {type(strategy).__name__}."
        )
    return strategy
