"""The ensemble's train loader: the user's DataLoader with its sampler replaced.

:func:`ensemble_batch_sampler` yields replica 0's data order in batches, then replica 1's, and
so on (see :class:`~lightning_selmerge.ensemble.EnsembleBatchSampler`); :class:`ResumableLoader`
keeps the dataset, batch size, ``drop_last``, collate function and workers, and lets Lightning
save and restore its position in the epoch. :func:`ensemble_loader` puts them together.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from lightning_selmerge.ensemble.device_groups import ReplicaLayout
    >>> user = DataLoader(list(range(8)), batch_size=2)
    >>> train_batch_size(user)
    (2, False)
    >>> sampler = ensemble_batch_sampler(
    ...     user.dataset, 2, ReplicaLayout(2, 1, 1, 0), seed=0, fixed_batches=False,
    ...     step_samples=None, batch_size=2, drop_last=False, per_replica_limit=None,
    ...     shard_size=1)
    >>> len(sampler), sampler.batches_per_replica
    (8, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.ensemble.device_groups import ReplicaLayout
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler
from lightning_selmerge.ensemble.trainer_checks import accumulation_scheduler

__all__ = [
    "BY_BATCH_SIZE",
    "ResumableLoader",
    "ensemble_batch_sampler",
    "ensemble_loader",
    "fixed_step_samples",
    "resumable_loader",
    "train_batch_size",
]

#: A checkpoint that predates ``fixed_step_samples``: its fixed batches were DataLoader batches.
BY_BATCH_SIZE = object()


class ResumableLoader(DataLoader):
    """The ensemble's train loader; Lightning saves and restores its position in the epoch.

    The position is counted in batches, so a resume in the middle of an epoch needs the same
    batches: the saved batch size, dataset length, ``drop_last`` and batches per replica must
    match this loader's, or the resume is refused (at an epoch's end any loader may follow).
    """

    progress: Callable[[], tuple[int, int]]  # () -> (epoch, batches done in it)
    checkpoint_name: Callable[[], str]  # the checkpoint being resumed, for messages

    def _shape(self) -> dict[str, Any]:
        sampler = self.batch_sampler
        assert isinstance(sampler, EnsembleBatchSampler)
        return {
            "batch_size": sampler.batch_size,
            "num_samples": len(sampler.sampler),
            "drop_last": sampler.drop_last,
            "batches_per_replica": sampler.batches_per_replica,
            "batches": len(sampler),
        }

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self.progress()
        return {"epoch": epoch, "batches_done": done, **self._shape()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert isinstance(self.batch_sampler, EnsembleBatchSampler)
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if 0 < done < state.get("batches", done + 1):  # saved inside the epoch
            self._check_same_batches(state, epoch, done)
        self.batch_sampler.resume(epoch, done)

    def _check_same_batches(self, saved: Mapping[str, Any], epoch: int, done: int) -> None:
        describe = {
            "batch_size": lambda v: f"batch_size={v}",
            "num_samples": lambda v: f"a dataset of {v} samples",
            "drop_last": lambda v: f"drop_last={v}",
            "batches_per_replica": lambda v: f"{v} batches per replica (limit_train_batches)",
        }
        for key, text in describe.items():
            ours = self._shape()[key]
            if key in saved and saved[key] != ours:  # checkpoints before 0.2 lack the keys
                raise MisconfigurationException(
                    f"DataOrderEnsemble: the checkpoint {self.checkpoint_name()} was saved in "
                    f"the middle of epoch {epoch} (after {done} of its {saved['batches']} "
                    f"training batches) by a train loader with {text(saved[key])}, but this "
                    f"fit's loader has {text(ours)}. The position in the epoch counts batches, "
                    "so the replicas would train on different numbers of samples; resume with "
                    f"{text(saved[key])}, or from a checkpoint saved at an epoch's end (any "
                    "loader may follow one)."
                )


def train_batch_size(dataloader: object) -> tuple[int, bool]:
    """``(batch_size, drop_last)`` of the user's train loader, which must be a map-style torch
    ``DataLoader`` with a batch size."""
    if isinstance(dataloader, DataLoader) and isinstance(dataloader.dataset, IterableDataset):
        raise MisconfigurationException(
            f"DataOrderEnsemble: the train dataset {type(dataloader.dataset).__name__} is an "
            "IterableDataset, which yields samples in its own order; the ensemble gives "
            "each replica its own order of a map-style dataset (one with __len__ and "
            "__getitem__): turn the data into a map-style Dataset (e.g. a list of samples)."
        )
    if not isinstance(dataloader, DataLoader):
        raise MisconfigurationException(
            "DataOrderEnsemble needs a map-style torch DataLoader with a batch_size as the "
            f"train dataloader (got {type(dataloader).__name__}); it replaces its sampler."
        )
    batch_size = dataloader.batch_size
    if batch_size is None:
        batch_size = getattr(dataloader.batch_sampler, "batch_size", None)
    if batch_size is None:
        raise MisconfigurationException(
            "DataOrderEnsemble: the train DataLoader has no batch_size; give it one, "
            "e.g. DataLoader(dataset, batch_size=32)."
        )
    drop_last = bool(getattr(dataloader.batch_sampler, "drop_last", dataloader.drop_last))
    return batch_size, drop_last


def fixed_step_samples(trainer: Any, batch_size: int, shard_size: int, resumed: Any) -> int:
    """The samples of one optimizer step, which ``fixed_batches=True`` fixes together.

    ``resumed``: the resumed checkpoint's number (``None`` without one, :data:`BY_BATCH_SIZE`
    for a checkpoint that predates it), which must match this fit's."""
    if accumulation_scheduler(trainer) is not None:
        raise MisconfigurationException(
            "DataOrderEnsemble(fixed_batches=True) fixes the samples of each optimizer "
            "step, whose number a GradientAccumulationScheduler changes between epochs; "
            "use a constant accumulate_grad_batches with fixed_batches."
        )
    # an optimizer step takes accumulate x shard_size consecutive rank-batches of the
    # replica's order (EnsembleBatchSampler): that many fixed together stay one step
    step_samples = batch_size * shard_size * trainer.accumulate_grad_batches
    if resumed is BY_BATCH_SIZE:
        resumed = batch_size
    if resumed is not None and resumed != step_samples:
        raise MisconfigurationException(
            f"DataOrderEnsemble(fixed_batches=True): the checkpoint fixed {resumed} "
            f"samples per optimizer step, this fit {step_samples} (batch_size x "
            "shard_size x accumulate_grad_batches); resume with the checkpoint's "
            "settings, or start a new fit without ckpt_path."
        )
    return step_samples


def ensemble_batch_sampler(
    dataset: Dataset,
    num_replicas: int,
    layout: ReplicaLayout,
    *,
    seed: int,
    fixed_batches: bool,
    step_samples: int | None,
    batch_size: int,
    drop_last: bool,
    per_replica_limit: int | None,
    shard_size: int,
) -> EnsembleBatchSampler:
    """The batches of this rank's replicas (``layout.local_replicas``), one after another."""
    orders = DataOrderSampler(
        dataset,
        seed=seed,
        fixed_batches=fixed_batches,
        batch_size=step_samples,
    )
    sampler = EnsembleBatchSampler(
        orders,
        num_replicas,
        batch_size,
        drop_last,
        per_replica_limit,
        replicas=layout.local_replicas,
        num_shards=shard_size,
        shard_rank=layout.shard_rank,
    )
    if sampler.batches_per_replica == 0:
        raise MisconfigurationException(
            "DataOrderEnsemble: each replica gets 0 training batches; use a smaller "
            "batch_size or drop_last=False."
        )
    return sampler


def resumable_loader(
    dataloader: DataLoader,
    sampler: EnsembleBatchSampler,
    trainer: Any,
    loader_class: type[ResumableLoader] = ResumableLoader,
) -> ResumableLoader:
    """The user's loader with ``sampler`` as its batch sampler, its position tracked by the
    fit loop (saved in checkpoints, restored on resume). ``loader_class``: a subclass with its
    own saved state (a replica job's)."""
    loader = loader_class(
        dataloader.dataset,
        batch_sampler=sampler,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        persistent_workers=dataloader.persistent_workers,
    )
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    loader.progress = lambda: (trainer.current_epoch, progress.processed)
    loader.checkpoint_name = lambda: Path(str(trainer.ckpt_path)).name
    return loader


#: the samplers a DataLoader builds from ``shuffle`` (and Lightning's on several ranks):
#: replacing them loses nothing (each replica's order is its own permutation of the dataset)
_PLAIN_SAMPLERS = (SequentialSampler, RandomSampler, DistributedSampler)


def _warn_replaced_sampler(dataloader: DataLoader) -> None:
    """Warn when the train loader's own sampler or batch sampler does more than order it."""
    batch_sampler = dataloader.batch_sampler
    custom = [
        type(obj).__name__
        for obj in (dataloader.sampler, batch_sampler)
        if obj is not None
        and type(obj) not in _PLAIN_SAMPLERS
        and not isinstance(obj, BatchSampler)
    ]
    if isinstance(batch_sampler, BatchSampler) and type(batch_sampler) is not BatchSampler:
        custom.append(type(batch_sampler).__name__)
    if custom:
        rank_zero_warn(
            f"DataOrderEnsemble: the train loader's {', '.join(dict.fromkeys(custom))} is "
            "replaced: each replica trains on its own permutation of the whole dataset in "
            "batches of batch_size (weights, num_samples or a custom batching are not used). "
            "To sample otherwise, subset or repeat the dataset itself."
        )


def ensemble_loader(
    dataloader: object,
    trainer: Any,
    layout: ReplicaLayout,
    *,
    seed: int,
    fixed_batches: bool,
    per_replica_limit: int | None,
    resumed_step_samples: Any,
) -> tuple[ResumableLoader, int | None]:
    """The ensemble's train loader made from the user's, and the samples of one optimizer step
    that ``fixed_batches`` fixes (``None`` without it; ``resumed_step_samples``: as in
    :func:`fixed_step_samples`). Its batch sampler yields this rank's replicas' batches."""
    batch_size, drop_last = train_batch_size(dataloader)
    assert isinstance(dataloader, DataLoader)
    _warn_replaced_sampler(dataloader)
    step_samples = None  # with fixed_batches: the samples of one optimizer step, fixed
    if fixed_batches:
        resumed = resumed_step_samples
        step_samples = fixed_step_samples(trainer, batch_size, layout.shard_size, resumed)
    sampler = ensemble_batch_sampler(
        dataloader.dataset,
        layout.num_replicas,
        layout,
        seed=seed,
        fixed_batches=fixed_batches,
        step_samples=step_samples,
        batch_size=batch_size,
        drop_last=drop_last,
        per_replica_limit=per_replica_limit,
        shard_size=layout.shard_size,
    )
    return resumable_loader(dataloader, sampler, trainer), step_samples
