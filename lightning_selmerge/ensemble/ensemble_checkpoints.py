"""How :class:`DataOrderEnsemble` saves and resumes a fit: Lightning's checkpoint hooks.

A mixin of the strategy (which provides the replicas, ``_swap``, and the ranks). What goes in the
file and how it is written lives in :mod:`.checkpoint_format`; this is the strategy's side: the
ensemble's state under :data:`CHECKPOINT_KEY`, the merged model as a weights-only checkpoint's
``state_dict``, and on resume the live replica (not the merge) loaded into the module.

Example:
    >>> from lightning_selmerge.ensemble import DataOrderEnsemble
    >>> strategy = DataOrderEnsemble(num_replicas=2, seed=3)
    >>> isinstance(strategy, EnsembleCheckpoints)
    True
    >>> {k: strategy._identity()[k] for k in ("num_replicas", "seed", "fixed_batches")}
    {'num_replicas': 2, 'seed': 3, 'fixed_batches': False}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from lightning_selmerge.ensemble.checkpoint_format import (
    CHECKPOINT_KEY,
    check_compatible,
    resume_state,
    save_atomic,
    save_rank_directory,
)
from lightning_selmerge.ensemble.loader import BY_BATCH_SIZE
from lightning_selmerge.ensemble.parallel import ReplicaMeshStrategy
from lightning_selmerge.ensemble.rng import rng_states
from lightning_selmerge.merging.leftovers import recover_output

if TYPE_CHECKING:
    from lightning_selmerge.ensemble.replica_swap import ReplicaSwap

__all__ = ["EnsembleCheckpoints"]


class EnsembleCheckpoints(ReplicaMeshStrategy):
    """The checkpoint hooks of :class:`DataOrderEnsemble` (its base class; see there for the
    checkpoint layout on one rank and on several)."""

    seed: int
    fixed_batches: bool
    _swap: ReplicaSwap
    _fixed_step_samples: int | None
    _resumed_step_samples: Any
    _to_restore: dict[str, Any] | None
    _rng_base: int
    #: a resumed fit's checkpoint ``state_dict`` (the merge) until training starts: what the
    #: module ends holding when the fit had nothing left to train
    _resumed_model: Mapping[str, torch.Tensor] | None = None
    #: set by ``SelectionMergeCallback``: the latest merge (whole on global rank 0; ``None``
    #: before the first), which a weights-only checkpoint stores as ``state_dict``.
    weights_only_state: Callable[[], dict[str, torch.Tensor] | None] | None = None

    def ensemble_state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the ensemble exactly (saved in checkpoints)."""
        return {
            **self._identity(),
            **self._swap.state_dict(live_as_module=not self.is_distributed),
            "rng": rng_states(),
            "rng_base": self._rng_base,
        }

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self.is_distributed:  # every rank's optimizer states are in its rank file
            return {}
        return super().optimizer_state(optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.is_distributed and self._fitting():
            return  # restored from the rank file with the live replica
        super().load_optimizer_state_dict(checkpoint)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        # a full checkpoint (not weights-only) of a fit that started training
        full = "optimizer_states" in checkpoint and self._swap.initial is not None
        if "optimizer_states" not in checkpoint and self.weights_only_state is not None:
            merged = self.weights_only_state()  # a collective when sharded: every rank is here
            if merged is not None:  # the merge, not the replica live now (no resume state)
                checkpoint["state_dict"] = merged
        if not self.is_distributed:
            if full:
                checkpoint[CHECKPOINT_KEY] = self.ensemble_state_dict()
            local = "://" not in str(filepath)  # remote ("s3://...") paths go to checkpoint_io
            if local and type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None:
                if self.is_global_zero:
                    save_atomic(checkpoint, Path(filepath))
                return
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        state = self.ensemble_state_dict if full else None
        save_rank_directory(self, checkpoint, filepath, state, self._identity())

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict:
        path = Path(str(checkpoint_path))
        if "://" not in str(checkpoint_path) and not path.exists():
            recover_output(path)  # a per-rank directory a killed save left half swapped
        if path.is_dir():
            checkpoint = self.checkpoint_io.load_checkpoint(
                path / "checkpoint.pt", weights_only=False
            )
        else:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None or not self._fitting():
            return checkpoint
        self._check_compatible(saved, checkpoint_path)
        # checked against this fit's value when the loader is set up; checkpoints before it
        # was recorded grouped fixed batches by the DataLoader's batch_size
        self._resumed_step_samples = saved.get("fixed_step_samples", BY_BATCH_SIZE)
        self._to_restore = resume_state(saved, path, self.global_rank)
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and self._fitting():
            self._resumed_model = checkpoint["state_dict"]  # see end_untrained_resume
            if saved.get("per_rank_files"):
                return  # each rank loads its live replica from its rank file at train start
            if saved["live"] is not None:
                # resuming: the module continues as the live replica, not as the merged model
                checkpoint = {**checkpoint, "state_dict": saved["live"]}
        super().load_model_state_dict(checkpoint, strict=strict)

    def end_untrained_resume(self) -> None:
        """A resumed fit that trained nothing (its checkpoint was saved after the fit's last
        epoch, so Lightning skips training and the hooks that merge): leave the module holding
        the checkpoint's ``state_dict`` (the merge), as the fit that saved it ended, not the
        live replica loaded to go on training. Called at teardown; training clears it."""
        state, self._resumed_model = self._resumed_model, None
        module = self._lightning_module
        if state is None or module is None or module._trainer is None:
            return
        if not module.trainer.interrupted:  # an error or interrupt leaves the module as it is
            self.load_module_state(self.local_slices(state))

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)  # files and directories alike

    def _fitting(self) -> bool:
        module = self._lightning_module
        return (
            module is not None
            and module._trainer is not None
            and module.trainer.state.fn == TrainerFn.FITTING
        )

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (checked by :meth:`_check_compatible`)."""
        return {
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "fixed_batches": self.fixed_batches,
            "fixed_step_samples": self._fixed_step_samples,
            "layout": self._layout.to_dict(),
        }

    def _check_compatible(self, saved: Mapping[str, Any], path: _PATH) -> None:
        settings = {name: getattr(self, name) for name in ("num_replicas", "seed", "fixed_batches")}
        check_compatible(saved, path, self._layout, self.shard_size, settings)
