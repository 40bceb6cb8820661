"""What a :class:`~lightning_selmerge.ensemble.ReplicaJob` refuses: its arguments, and the
trainer settings that independent jobs cannot reproduce.

Example:
    >>> from lightning.pytorch import Trainer
    >>> check_trainer(Trainer(accelerator="cpu", devices=1, logger=False))
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["check_replica_args", "check_trainer"]


def check_replica_args(num_replicas: Any, replica: Any) -> None:
    """Refuse a K that is not an int >= 2 and a replica index outside ``0 .. K-1``.

    Example:
        >>> check_replica_args(4, 3)
        >>> try:
        ...     check_replica_args(4, 4)
        ... except ValueError as err:
        ...     print(str(err)[:55])
        ReplicaJob: replica=4 is not one of the 4 replicas: use
    """
    for name, value in (("num_replicas", num_replicas), ("replica", replica)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"ReplicaJob: {name}={value!r} must be an int.")
    if num_replicas < 2:
        raise ValueError(
            f"ReplicaJob: num_replicas={num_replicas}; a replica job is one of K >= 2 replicas "
            "(for a single model, fit without ReplicaJob)."
        )
    if not 0 <= replica < num_replicas:
        raise ValueError(
            f"ReplicaJob: replica={replica} is not one of the {num_replicas} replicas: use 0 .. "
            f"{num_replicas - 1} (replica k of K counts from 0, as SLURM_ARRAY_TASK_ID does "
            f"with --array=0-{num_replicas - 1})."
        )


def check_trainer(trainer: Any) -> None:
    """What a :class:`~lightning_selmerge.ensemble.ReplicaJob` refuses: the ensemble strategy
    or merge callback (one replica per fit), the position monitor on several ranks, ZeRO-3."""
    from lightning_selmerge.ensemble.callback import SelectionMergeCallback
    from lightning_selmerge.ensemble.strategy import DataOrderEnsemble
    from lightning_selmerge.imbalance.monitor import PositionLossMonitor

    if isinstance(trainer.strategy, DataOrderEnsemble):
        raise MisconfigurationException(
            "ReplicaJob trains ONE replica of the ensemble per fit, DataOrderEnsemble all K "
            "in one fit: use one or the other (a replica job takes an ordinary strategy, "
            "e.g. 'auto', 'ddp' or 'fsdp')."
        )
    for callback in trainer.callbacks:
        if isinstance(callback, SelectionMergeCallback):
            sync = (
                " sync_replicas=True resets every replica to the merge after each epoch, "
                "which independent jobs cannot do: use the in-process DataOrderEnsemble "
                "for it."
                if callback.sync_replicas
                else " Merge the jobs' snapshots afterwards: lightning-selmerge merge "
                "--epoch_dir SNAPSHOT_DIR/epoch_NNN."
            )
            raise MisconfigurationException(
                "ReplicaJob: SelectionMergeCallback merges the replicas of a "
                "DataOrderEnsemble fit, and a replica job holds one replica." + sync
            )
        if isinstance(callback, PositionLossMonitor) and trainer.world_size > 1:
            raise MisconfigurationException(
                "ReplicaJob: PositionLossMonitor counts positions of a strided sampler, "
                "but a replica job on several ranks deals whole batches to the ranks: run "
                "the monitor in a job on one device, or drop it."
            )
    if getattr(trainer.strategy, "zero_stage_3", False):
        raise MisconfigurationException(
            "ReplicaJob: DeepSpeed ZeRO stage 3 partitions the weights and its full state "
            "dict is not gathered here; use FSDP (or ZeRO stage 1/2) for the replica jobs."
        )
