"""The training recipe a replica job records beside its snapshots, so that K jobs of one run
started with different settings (another learning rate, batch size, dataset, schedule) are caught
at the next job's start and at the merge instead of being merged silently.

A recipe is plain JSON: the module's class and its JSON-valued ``hparams`` (strings holding a
path separator left out: jobs may read the same files from different places), every optimizer's
class and parameter-group settings (without the implementation switches ``foreach``, ``fused``,
``capturable`` and ``differentiable``), every LR scheduler's class, interval, frequency and
settings (with its schedule functions' names and bound arguments, and the schedulers it
chains), the train data's size, batch size, ``drop_last``, batches per epoch and the number of
ranks training the replica side by side (each its own batches), and the trainer's
``max_epochs``, ``max_steps``, ``accumulate_grad_batches``, gradient clipping and precision.
What may differ between jobs is left out: the strategy, paths, loggers, workers.

A resumed job records what it trains with from then on (a batch size changed at the resume is
seen by the merge), but the optimizer and scheduler settings it started with (their live values,
a scheduled learning rate, come from the checkpoint) and the fit's length it started with (a
resume that extends the fit keeps the job one of its run).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer

__all__ = ["plain_settings", "resumed_recipe", "training_recipe"]

#: optimizer switches that choose an implementation, not the update
_IMPLEMENTATION_SWITCHES = frozenset({"foreach", "fused", "capturable", "differentiable"})
#: the trainer settings a resume may change to extend the fit
_FIT_LENGTH = ("max_epochs", "max_steps")
#: scheduler state that counts progress (identical at every fresh start) or only reports
_SCHEDULER_PROGRESS = frozenset(
    {
        "last_epoch",
        "verbose",
        "best",
        "num_bad_epochs",
        "_last_lr",
        "_step_count",
        "_get_lr_called_within_step",
        "_is_initial",
    }
)


def plain_settings(value: Any) -> Any:
    """``value`` with only what JSON holds exactly: finite numbers, bools, ``None``, strings
    without a path separator, and lists and string- or int-keyed dicts of those (int keys as
    strings, as JSON writes them; the rest is dropped: a list holding anything else, a dict's
    other entries; ``None`` for a dict with none left).

    Example:
        >>> plain_settings({"lr": 1e-3, "betas": (0.9, 0.999), "path": "/data/x", "fn": print})
        {'lr': 0.001, 'betas': [0.9, 0.999]}
    """
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return None if "/" in value or "\\" in value else value
    if isinstance(value, (list, tuple)):
        items = [plain_settings(item) for item in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    if isinstance(value, Mapping):
        kept = {}
        for key, item in value.items():
            plain = plain_settings(item)
            plain_key = isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))
            if plain_key and (plain is not None or item is None):
                kept[str(key)] = plain  # an int key as JSON writes it (MultiStepLR's milestones)
        return kept or None
    return None


def _qualified_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _optimizer(optimizer: Any) -> dict[str, Any]:
    groups = []
    for group in optimizer.param_groups:
        settings = {
            k: v for k, v in group.items() if k != "params" and k not in _IMPLEMENTATION_SWITCHES
        }
        settings = plain_settings(settings) or {}
        # how many tensors it trains (their sizes would depend on sharding: FSDP's local views)
        settings["num_tensors"] = len(group["params"])
        groups.append(settings)
    return {"class": _qualified_name(optimizer), "groups": groups}


def _function(fn: Any) -> Any:
    """A schedule function as settings: its qualified name, a ``functools.partial``'s
    arguments (transformers' ``get_linear_schedule_with_warmup`` binds its step counts so), a
    callable object's attributes."""
    if isinstance(fn, functools.partial):
        return {"function": _function(fn.func), "args": fn.args, "keywords": fn.keywords}
    name = getattr(fn, "__qualname__", None)
    if name:  # a function (a lambda too)
        return f"{fn.__module__}.{name}"
    return {"callable": _qualified_name(fn), "state": vars(fn) if hasattr(fn, "__dict__") else {}}


def _scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """A scheduler's settings: its state without progress counters, its schedule functions
    (``LambdaLR``), and its nested schedulers' settings (``SequentialLR``, ``ChainedScheduler``)."""
    state = {k: v for k, v in scheduler.state_dict().items() if k not in _SCHEDULER_PROGRESS}
    if callable_lambdas := getattr(scheduler, "lr_lambdas", None):
        state["lr_lambdas"] = [_function(fn) for fn in callable_lambdas]
    if nested := getattr(scheduler, "_schedulers", None):
        state["_schedulers"] = [
            {"class": _qualified_name(inner), "settings": _scheduler_settings(inner)}
            for inner in nested
        ]
    return plain_settings(state) or {}


def _scheduler(config: Any) -> dict[str, Any]:
    scheduler = config.scheduler
    return {
        "class": _qualified_name(scheduler),
        "interval": config.interval,
        "frequency": config.frequency,
        "settings": _scheduler_settings(scheduler),
    }


def training_recipe(
    trainer: Trainer, pl_module: LightningModule, data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The recipe of a fit at its start (call it from ``on_train_start``), as plain JSON;
    ``data`` describes the train data (its size, batch size, ``drop_last``)."""
    recipe = {
        "module": _qualified_name(pl_module),
        "hparams": plain_settings(dict(pl_module.hparams)),
        "optimizers": [_optimizer(optimizer) for optimizer in trainer.optimizers],
        "lr_schedulers": [_scheduler(config) for config in trainer.lr_scheduler_configs],
        "data": plain_settings(data),
        "trainer": {
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip_val": trainer.gradient_clip_val,
            "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
            "precision": str(trainer.precision),
        },
    }
    return json.loads(json.dumps(recipe))  # tuples as lists: as a record reads back


def resumed_recipe(started: Mapping[str, Any] | None, now: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe of a resumed job: ``now`` (at the resume), with the optimizer and scheduler
    settings and the fit's length (``max_epochs``, ``max_steps``) the job ``started`` with (a
    checkpoint restores the live, scheduled values; a resume may extend the fit).

    Example:
        >>> started = {"optimizers": [{"groups": [{"lr": 0.1}]}], "data": {"batch_size": 8}}
        >>> now = {"optimizers": [{"groups": [{"lr": 0.05}]}], "data": {"batch_size": 16}}
        >>> resumed_recipe(started, now)
        {'optimizers': [{'groups': [{'lr': 0.1}]}], 'data': {'batch_size': 16}}
    """
    if started is None:  # a checkpoint of a version that recorded none
        return None
    kept = {key: started[key] for key in ("optimizers", "lr_schedulers") if key in started}
    recipe = {**now, **kept}
    if isinstance(started.get("trainer"), Mapping) and isinstance(now.get("trainer"), Mapping):
        # the fit's length as started: resuming to extend it keeps the job one of its run
        length = {k: started["trainer"][k] for k in _FIT_LENGTH if k in started["trainer"]}
        recipe["trainer"] = {**now["trainer"], **length}
    return recipe
