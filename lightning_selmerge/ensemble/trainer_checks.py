"""What :class:`~lightning_selmerge.ensemble.DataOrderEnsemble` refuses in a Trainer's settings,
and the bounds it makes per replica.

Each replica must train on whole optimizer steps of its own batches, and the fit must end at an
epoch's end, so that every replica trains alike; these checks name the setting and the fix.

Example:
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=2,
    ...                   accumulate_grad_batches=2, enable_progress_bar=False)
    >>> check_trainer(trainer)
    >>> replica_steps(trainer, batches_per_replica=6, scheduler=None, epoch=0)
    3
    >>> per_replica_limit(trainer, local_replicas=4) is None  # no int limit_train_batches
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = [
    "accumulation",
    "accumulation_scheduler",
    "check_num_replicas",
    "check_offload",
    "check_one_train_loader",
    "check_stepping",
    "check_trainer",
    "per_replica_limit",
    "replica_steps",
    "set_scheduled_accumulation",
    "steps_per_replica",
]


def check_num_replicas(value: object) -> None:
    """``num_replicas`` must be a whole number (any integer type but ``bool``) >= 2."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"DataOrderEnsemble: num_replicas={value!r} is a {type(value).__name__}: give a "
            "whole number K >= 2 of replicas, e.g. num_replicas=4."
        )
    if value == 1:
        raise ValueError(
            "DataOrderEnsemble: num_replicas=1 trains a single model; use num_replicas >= 2 "
            "(or a plain strategy for one model)."
        )
    if value < 1:
        raise ValueError(
            f"DataOrderEnsemble: num_replicas={value}: the number of replicas must be at least "
            "2, e.g. num_replicas=4."
        )


def check_offload(offload: object) -> None:
    """``offload`` must be ``"cpu"`` or ``"disk"``."""
    if offload not in ("cpu", "disk"):
        raise ValueError(
            f"DataOrderEnsemble: offload={offload!r}; use 'cpu' (inactive replicas in CPU "
            "memory) or 'disk' (in safetensors files under offload_dir)."
        )


def check_initialized(module: Any) -> None:
    """Refuse lazy parameters not materialised by train start: every replica starts from the
    module's weights there, so they must exist."""
    from torch.nn.parameter import UninitializedParameter

    lazy = [n for n, p in module.named_parameters() if isinstance(p, UninitializedParameter)]
    if lazy:
        raise MisconfigurationException(
            f"DataOrderEnsemble: {lazy[0]} (a lazy module's parameter) is not initialised at "
            "train start, where every replica copies the module's weights; run one forward pass "
            "before the fit (e.g. on an example batch in LightningModule.setup), or keep "
            "num_sanity_val_steps > 0 with a validation loader."
        )


def warn_padded_evaluation(dataloader: object, shard_size: int) -> None:
    """Warn when an evaluation loader split over ``shard_size`` ranks is padded (Lightning's
    DistributedSampler repeats samples up to a multiple of the ranks)."""
    dataset = getattr(dataloader, "dataset", None)
    try:
        count = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return
    if shard_size > 1 and count % shard_size:
        rank_zero_warn(
            f"DataOrderEnsemble: {count} evaluation samples split over shard_size={shard_size} "
            f"ranks: the split pads them to a multiple of {shard_size}, so "
            f"{shard_size - count % shard_size} sample(s) count twice in the metrics; give a "
            f"number of samples divisible by {shard_size} for exact values."
        )


def warn_without_merge(trainer: Any, num_replicas: int) -> None:
    """Warn when no ``SelectionMergeCallback`` merges the replicas."""
    names = {cls.__name__ for callback in trainer.callbacks for cls in type(callback).__mro__}
    if "SelectionMergeCallback" not in names:
        rank_zero_warn(
            "DataOrderEnsemble without SelectionMergeCallback: the replicas are not merged, and "
            f"the module ends the fit holding replica {num_replicas - 1}'s weights (validation "
            "scores the replica live then); add SelectionMergeCallback() to merge them, or read "
            "them with trainer.strategy.replica_states()."
        )


def check_trainer(trainer: Any) -> None:
    """Refuse the tuners, weight averaging over steps (EMA, SWA), mid-epoch validation, a
    fractional ``limit_train_batches`` and ``overfit_batches`` (checked when a fit starts)."""
    tuners = [c for c in trainer.callbacks if isinstance(c, (BatchSizeFinder, LearningRateFinder))]
    if tuners:
        raise MisconfigurationException(
            f"DataOrderEnsemble: {type(tuners[0]).__name__} (Tuner.lr_find / "
            "scale_batch_size) runs a few steps of one model, which the ensemble would split "
            "between replicas and reset at each replica's start; tune with a plain strategy "
            "(one model), then fit the ensemble with the values found."
        )
    averaging = [
        c for c in trainer.callbacks if isinstance(c, (WeightAveraging, StochasticWeightAveraging))
    ]
    if averaging:
        raise MisconfigurationException(
            f"DataOrderEnsemble: {type(averaging[0]).__name__} averages the live module's "
            "weights over the steps, which the ensemble spends on K replicas in turn: its "
            "average would mix them, and the module it validates is no merge; drop it "
            "(SelectionMergeCallback merges the replicas), or average one model with a plain "
            "strategy."
        )
    interval = trainer.val_check_interval
    if not (isinstance(interval, float) and interval == 1.0):
        raise MisconfigurationException(
            f"DataOrderEnsemble: val_check_interval={interval!r} would validate in the "
            "middle of the replicas' pass; use val_check_interval=1.0 (the default) and "
            "check_val_every_n_epoch to validate less often."
        )
    limit = trainer.limit_train_batches
    if isinstance(limit, float) and limit not in (0.0, 1.0):
        raise MisconfigurationException(
            f"DataOrderEnsemble: limit_train_batches={limit} (a fraction) would cut the "
            "later replicas out of the epoch; give an int, which DataOrderEnsemble applies "
            "per replica (limit_train_batches=10 trains each replica on 10 batches)."
        )
    if trainer.overfit_batches > 0:
        raise MisconfigurationException(
            "DataOrderEnsemble: overfit_batches is not supported; use limit_train_batches "
            "(per replica) instead."
        )


def check_one_train_loader(trainer: Any) -> None:
    """Refuse several train dataloaders (a dict or list of them, a ``CombinedLoader``): the
    ensemble orders the batches of one loader per replica (checked at train start)."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return
    count = len(CombinedLoader(loaders).flattened)
    if count > 1:
        names = tuple(loaders) if isinstance(loaders, Mapping) else tuple(range(count))
        raise MisconfigurationException(
            f"DataOrderEnsemble: the fit has {count} train dataloaders {names}, but it gives "
            "each replica its own order of one map-style train loader (replacing its sampler): "
            "several loaders would each run the replicas' orders at their own length, out of "
            "step with the replica switches. Combine the data into one Dataset (e.g. one whose "
            "items hold a sample of each) and one DataLoader."
        )


def per_replica_limit(trainer: Any, local_replicas: int) -> int | None:
    """Make the fit's batch bounds per replica, for the ``local_replicas`` this rank trains.

    ``fast_dev_run``'s ``max_steps`` would stop inside the first replica: it is widened to give
    each replica its steps. An int ``limit_train_batches`` is returned, for the ensemble sampler
    to apply per replica, and the trainer's is set to 1.0 (``None`` when there is none)."""
    if trainer.fast_dev_run:
        steps = -(-int(trainer.fast_dev_run) // trainer.accumulate_grad_batches)
        trainer.fit_loop.epoch_loop.max_steps = steps * local_replicas
    limit = trainer.limit_train_batches
    if isinstance(limit, int) and limit > 0:
        trainer.limit_train_batches = 1.0  # the ensemble sampler applies it per replica
        return limit
    return None


def check_stepping(
    trainer: Any, batches_per_replica: int, local_replicas: int, batch_idx: int | None = None
) -> None:
    """Refuse an optimizer step that would span two replicas, or a ``max_steps`` that would
    stop inside an epoch (under automatic optimization; manual steps cannot be foreseen).

    ``local_replicas``: how many replicas this rank trains one after another. At loader setup
    (no ``batch_idx``) the whole fit is checked, a ``GradientAccumulationScheduler``'s schedule
    included, so that a bad epoch is refused before training starts; at every batch, the
    current epoch as it runs (a resume, or a setting changed by a callback)."""
    batches = batches_per_replica
    scheduler = accumulation_scheduler(trainer) if batch_idx is None else None
    max_epochs = trainer.max_epochs
    bounded = max_epochs is not None and max_epochs >= 0
    if scheduler is None:
        schedule = [(trainer.current_epoch, trainer.accumulate_grad_batches)]
    else:
        last = max(scheduler.scheduling, default=0) + 1  # constant from there on
        epochs = range(min(max_epochs, last) if bounded else last)
        schedule = [(e, accumulation(trainer, scheduler, e)) for e in epochs]
    for epoch, accumulate in schedule:
        if batches % accumulate:
            raise MisconfigurationException(
                f"DataOrderEnsemble: accumulate_grad_batches={accumulate} (epoch {epoch}) "
                f"does not divide the {batches} batches of each replica, so one optimizer "
                "step would mix two replicas' gradients; choose a divisor of it, also in a "
                "GradientAccumulationScheduler's schedule (or change batch_size / "
                "limit_train_batches)."
            )
    max_steps = trainer.max_steps
    if max_steps <= 0 or not trainer.lightning_module.automatic_optimization:
        return
    local = local_replicas  # this rank trains them one after another
    if batch_idx is not None:  # scheduler is None: the epoch's own accumulation
        before = trainer.global_step - batch_idx // trainer.accumulate_grad_batches
        after = before + local * replica_steps(trainer, batches, None, trainer.current_epoch)
    else:
        before, after, epoch = 0, 0, 0
        while after < max_steps and not (bounded and epoch >= max_epochs):
            before = after
            after += local * replica_steps(trainer, batches, scheduler, epoch)
            epoch += 1
    if before < max_steps < after:
        raise MisconfigurationException(
            f"DataOrderEnsemble: max_steps={max_steps} would stop training inside an epoch "
            f"(epochs end at optimizer steps {before} and {after} here, each one training "
            f"the {local} replicas one after another), so the later replicas would miss "
            "part of it and the merge would mix unequally trained replicas; bound the fit "
            "with max_epochs (and an int limit_train_batches, which applies per replica) "
            f"or set max_steps to an epoch's end such as {after}."
        )


def replica_steps(
    trainer: Any,
    batches_per_replica: int,
    scheduler: GradientAccumulationScheduler | None,
    epoch: int,
) -> int:
    """Optimizer steps one replica takes in ``epoch`` (automatic optimization; the
    accumulation divides its batches, see :func:`check_stepping`)."""
    return batches_per_replica // accumulation(trainer, scheduler, epoch)


def steps_per_replica(
    trainer: Any,
    local_replicas: int,
    batches_per_replica: int | None,
    optimizer_steps_per_batch: int | None = None,
) -> int | float:
    """Optimizer steps one of the ``local_replicas`` takes over the fit: ``max_steps`` shared
    by them, and ``max_epochs`` epochs of ``batches_per_replica`` (``inf`` without a bound).

    The epochs count each one's accumulation (a ``GradientAccumulationScheduler``'s too); under
    manual optimization, the replica's batches, and ``max_steps`` (which Lightning counts in
    ``optimizer.step()`` calls of every optimizer) needs ``optimizer_steps_per_batch``, the
    calls one batch makes. ``batches_per_replica`` is needed only with a ``max_epochs``."""
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    manual = not trainer.lightning_module.automatic_optimization
    per_step = _manual_steps_per_batch(max_steps, optimizer_steps_per_batch) if manual else 1
    by_steps = math.inf if max_steps == -1 else -(-max_steps // (local_replicas * per_step))
    if max_epochs is None or max_epochs == -1:
        return by_steps
    assert batches_per_replica is not None
    if manual:
        return min(batches_per_replica * max_epochs, by_steps)
    scheduler = accumulation_scheduler(trainer)
    total = sum(
        replica_steps(trainer, batches_per_replica, scheduler, epoch) for epoch in range(max_epochs)
    )
    return min(total, by_steps)


def _manual_steps_per_batch(max_steps: int, given: int | None) -> int:
    """The ``optimizer.step()`` calls of one batch under manual optimization, which turn
    ``max_steps`` into batches: ``given``, needed only when ``max_steps`` bounds the fit."""
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
        raise ValueError(
            f"DataOrderEnsemble.steps_per_replica: optimizer_steps_per_batch={given!r}; give "
            "the optimizer.step() calls of one training batch, all optimizers together (>= 1)."
        )
    if max_steps == -1:
        return 1
    if given is None:
        raise MisconfigurationException(
            f"DataOrderEnsemble.steps_per_replica: under manual optimization Lightning counts "
            f"max_steps={max_steps} in optimizer.step() calls of every optimizer, so the "
            "batches it leaves each replica depend on the calls one batch makes (2 with two "
            "optimizers each stepping once a batch: a schedule sized as if 1 would be twice "
            "too long); pass steps_per_replica(optimizer_steps_per_batch=N), or bound the "
            "fit with max_epochs alone (max_steps=-1)."
        )
    return given


def set_scheduled_accumulation(trainer: Any) -> None:
    """Set ``accumulate_grad_batches`` to a ``GradientAccumulationScheduler``'s value for the
    current epoch, at train start: the scheduler sets it in ``on_train_epoch_start``, which
    Lightning skips in the epoch a fit resumes into (the epoch would accumulate as the Trainer
    was built, neither as the schedule says nor as the uninterrupted fit did)."""
    scheduler = accumulation_scheduler(trainer)
    if scheduler is not None:
        trainer.accumulate_grad_batches = accumulation(trainer, scheduler, trainer.current_epoch)


def accumulation_scheduler(trainer: Any) -> GradientAccumulationScheduler | None:
    """The fit's ``GradientAccumulationScheduler`` callback, if any."""
    return next(
        (c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None
    )


def accumulation(trainer: Any, scheduler: GradientAccumulationScheduler | None, epoch: int) -> int:
    """``accumulate_grad_batches`` in ``epoch`` (a scheduler sets it only at the epoch's start)."""
    if scheduler is None:
        return trainer.accumulate_grad_batches
    return scheduler.get_accumulate_grad_batches(epoch)
