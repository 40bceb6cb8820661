"""``lightning-selmerge fit ... --replica k --num_replicas K --snapshot_dir DIR``: one replica job.

The same config that trains the in-process ensemble trains replica k of K as its own fit:

* the config's ``DataOrderEnsemble`` strategy (if any) gives way to Lightning's ``"auto"``
  strategy (one device, or DDP on several); its ``seed`` and ``fixed_batches`` go to the
  :class:`~lightning_selmerge.ensemble.ReplicaJob` callback that is added, and its
  ``num_replicas`` is K unless ``--num_replicas`` says otherwise. Its other options (offload,
  shard_size, start_method, ...) concern K replicas in one fit and are dropped; give the job
  its own strategy with ``--trainer.strategy`` (e.g. ``fsdp``) after ``--config``;
* ``--replica`` defaults to ``$SLURM_ARRAY_TASK_ID`` (a SLURM job array);
* ``SelectionMergeCallback`` is dropped, with a note giving the ``lightning-selmerge merge``
  command that merges the snapshots the same way (its ``sync_replicas=True`` is refused: jobs
  cannot reset each other to the merge); ``PositionLossMonitor`` stays (it measures this
  replica; on one device);
* loggers without a ``version`` get ``replica_{k:03d}``, so the K jobs log into one tree (the
  default logger becomes ``TensorBoardLogger(default_root_dir, version="replica_{k:03d}")``),
  and ``ModelCheckpoint(save_last="link", save_top_k=1)`` (each epoch's, ``last.ckpt`` a link to
  it) is added when no checkpoint callback is configured,
  so a requeued job resumes with ``--ckpt_path last``;
* ``seed_everything`` must be an int: every job must build the same initial model and draw
  the same dropout as the ensemble would.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from jsonargparse import Namespace

from lightning_selmerge.ensemble.replica_job import check_replica_args
from lightning_selmerge.ensemble.replica_snapshots import (
    RUN_KEYS,
    SnapshotMismatch,
    check_snapshot_dir,
)

__all__ = [
    "ReplicaJobRefused",
    "ReplicaSettings",
    "add_replica_arguments",
    "prepare_replica_job",
    "replica_trainer",
]

SLURM_TASK = "SLURM_ARRAY_TASK_ID"


@dataclass(frozen=True)
class ReplicaSettings:
    """What one replica job trains (resolved from the flags, the config and the environment)."""

    num_replicas: int
    replica: int
    seed: int
    snapshot_dir: str
    fixed_batches: bool
    checkpoint: bool  # add a ModelCheckpoint saving each epoch, last.ckpt linking to it


class ReplicaJobRefused(ValueError):
    """The replica-job flags, the config or the environment cannot make a replica job; the
    command line prints it as any mistake in the input (one line and the ``--debug`` hint,
    exit status 2, under the subcommand's name)."""


def refuse(message: str) -> NoReturn:
    raise ReplicaJobRefused(message)


def add_replica_arguments(parser: Any, shown: bool = True) -> None:
    """``--replica``, ``--num_replicas``, ``--snapshot_dir``: in ``--help`` when ``shown`` (fit's
    parser); the other subcommands take them unlisted, so that a config a fit saved (with their
    ``null`` values) loads there, and refuse a value (:func:`prepare_replica_job`)."""

    def helps(text: str) -> str:
        return text if shown else argparse.SUPPRESS

    parser.add_argument(
        "--replica",
        type=int | None,
        default=None,
        help=helps(
            "train replica k (0 .. K-1) of the ensemble as its own fit (default: "
            f"${SLURM_TASK} when --num_replicas or --snapshot_dir is given)"
        ),
    )
    parser.add_argument(
        "--num_replicas",
        type=int | None,
        default=None,
        help=helps(
            "K, the replicas of the run (default: the config's DataOrderEnsemble num_replicas)"
        ),
    )
    parser.add_argument(
        "--snapshot_dir",
        type=str | None,
        default=None,
        help=helps(
            "replica jobs write snapshot_dir/epoch_{e:03d}/replica_{k:03d} after each epoch"
        ),
    )


def _class_name(value: Any) -> str | None:
    path = value.get("class_path") if isinstance(value, (Namespace, Mapping)) else None
    return None if path is None else str(path).rsplit(".", 1)[-1]


def _init_args(value: Any) -> Any:
    args = value.get("init_args") if isinstance(value, (Namespace, Mapping)) else None
    return args if args is not None else Namespace()


def _replica_index(flag: int | None, environ: Mapping[str, str]) -> int:
    if flag is not None:
        return flag
    task = environ.get(SLURM_TASK)
    if task is None:
        refuse(
            f"a replica job needs --replica k (0 .. K-1), or ${SLURM_TASK} set by a SLURM job "
            "array (sbatch --array=0-19 for K = 20)."
        )
    try:
        return int(task)
    except ValueError:
        refuse(f"${SLURM_TASK}={task!r} is not a replica index; pass --replica k.")


def _resolve(config: Namespace, environ: Mapping[str, str]) -> ReplicaSettings:
    trainer = config.trainer
    strategy = trainer.get("strategy")
    ensemble = _init_args(strategy) if _class_name(strategy) == "DataOrderEnsemble" else None
    num_replicas = config.get("num_replicas")
    if num_replicas is None and ensemble is not None:
        num_replicas = ensemble.get("num_replicas", 2)
    if num_replicas is None:
        refuse(
            "a replica job needs --num_replicas K (the config has no DataOrderEnsemble to take "
            "it from)."
        )
    if config.get("snapshot_dir") is None:
        refuse(
            "a replica job needs --snapshot_dir DIR (shared by the K jobs: each writes "
            "DIR/epoch_NNN/replica_kkk there)."
        )
    replica = _replica_index(config.get("replica"), environ)
    try:
        check_replica_args(num_replicas, replica)
    except ValueError as err:
        refuse(str(err).replace("ReplicaJob: ", "").replace("replica=", "--replica "))
    seed = config.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        refuse(
            f"seed_everything={seed!r}: replica jobs need one int seed (e.g. seed_everything: "
            "0 in the config), the same in every job, so that all build the same initial model "
            "and draw the dropout the ensemble would."
        )
    callbacks = trainer.get("callbacks") or []
    checkpoint = trainer.get("enable_checkpointing") is not False and not any(
        _class_name(c) == "ModelCheckpoint" for c in callbacks
    )
    settings = ReplicaSettings(
        num_replicas=num_replicas,
        replica=replica,
        seed=int((ensemble or Namespace()).get("seed", 0)),
        snapshot_dir=str(config.snapshot_dir),
        fixed_batches=bool((ensemble or Namespace()).get("fixed_batches", False)),
        checkpoint=checkpoint,
    )
    run = {key: getattr(settings, key) for key in RUN_KEYS}
    try:  # ReplicaJob checks it again at setup (and the initial model at train start)
        check_snapshot_dir(settings.snapshot_dir, run)
    except SnapshotMismatch as err:
        refuse(str(err).replace("ReplicaJob: ", ""))
    return settings


def _merge_note(callback: Any, settings: ReplicaSettings) -> str:
    args = _init_args(callback)
    if args.get("sync_replicas"):
        refuse(
            "SelectionMergeCallback(sync_replicas=True) resets every replica to the merge after "
            "each epoch, which independent replica jobs cannot do; train in one process with "
            "DataOrderEnsemble, or set sync_replicas: false."
        )
    method = args.get("method", "selection")
    method_args = _init_args(method) if isinstance(method, Namespace) else Namespace()
    flags = [f"--method {_method_name(method)}"]
    for key, value in [*vars(method_args).items(), *((k, args.get(k)) for k in _CALLBACK_FLAGS)]:
        if value is None or (key == "seed" and not value):
            continue
        shown = f"'{list(value)}'" if isinstance(value, (list, tuple)) else value
        flags.append(f"--{key} {shown}")
    if args.get("nonfinite") == "drop":
        flags.append("--drop_nonfinite")
    if args.get("rules"):
        flags.append("--rules RULES.yaml (the callback's rules, as a YAML list)")
    base = f"{settings.snapshot_dir}/initial"
    return (
        "replica job: SelectionMergeCallback dropped (a job holds one replica); merge an epoch "
        f"of the K jobs as it would with: lightning-selmerge merge --epoch_dir "
        f"{settings.snapshot_dir}/epoch_NNN --base {base} {' '.join(flags)} --out merged/epoch_NNN"
    )


#: SelectionMergeCallback's arguments that are the merge command's flags of the same name
_CALLBACK_FLAGS = ("resample", "weights", "probabilities", "seed")


def _method_name(method: Any) -> str:
    """The registered name of a configured method (a name, or ``class_path`` + ``init_args``)."""
    from lightning_selmerge.merging.methods import method_class, method_names

    if not isinstance(method, Namespace):
        return str(method)
    class_path = str(method.get("class_path", ""))
    for name in method_names():  # the class, by whichever module path re-exports it
        if class_path.rsplit(".", 1)[-1] == method_class(name).__qualname__:
            return name
    return class_path


def _version_loggers(trainer: Namespace, settings: ReplicaSettings) -> None:
    version = f"replica_{settings.replica:03d}"
    logger = trainer.get("logger")
    if logger is None or logger is True:
        trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(
                save_dir=trainer.get("default_root_dir") or os.getcwd(),
                name="lightning_logs",
                version=version,
            ),
        )
        return
    for one in logger if isinstance(logger, list) else [logger]:
        args = _init_args(one)
        if isinstance(one, Namespace) and "version" in args and args.get("version") is None:
            args.version = version


def prepare_replica_job(
    subcommand: str | None, config: Namespace, environ: Mapping[str, str] = os.environ
) -> ReplicaSettings | None:
    """The replica job the flags ask for (``None``: an ordinary fit), with ``config`` adjusted
    (loggers versioned, merge callback dropped); bad flags raise :class:`ReplicaJobRefused`."""
    names = ("replica", "num_replicas", "snapshot_dir")
    flags = [name for name in names if config.get(name) is not None]
    if not flags:
        return None
    if subcommand != "fit":
        refuse(f"--{flags[0]} is for 'fit' (a replica job trains); not for '{subcommand}'.")
    settings = _resolve(config, environ)
    trainer = config.trainer
    kept = []
    for callback in trainer.get("callbacks") or []:
        if _class_name(callback) == "SelectionMergeCallback":
            print(_merge_note(callback, settings), file=sys.stderr)
        else:
            kept.append(callback)
    trainer.callbacks = kept
    _version_loggers(trainer, settings)
    return settings


def replica_trainer(trainer_init: Any, settings: ReplicaSettings) -> dict[str, Any]:
    """Trainer arguments replacing the instantiated ``trainer_init`` ones: an ordinary strategy
    in place of ``DataOrderEnsemble``, and the ``ReplicaJob`` callback (+ checkpointing)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_selmerge.ensemble import DataOrderEnsemble, ReplicaJob

    strategy = trainer_init.get("strategy", "auto")
    if isinstance(strategy, DataOrderEnsemble):
        strategy = "auto"
    job = ReplicaJob(
        settings.num_replicas,
        settings.replica,
        settings.seed,
        settings.snapshot_dir,
        fixed_batches=settings.fixed_batches,
    )
    callbacks = [job, *(trainer_init.get("callbacks") or [])]
    if settings.checkpoint:
        # every epoch, the newest only, last.ckpt a link to it (one full training state on
        # disk): save_top_k=0 wrote last.ckpt at the fit's end only, so a requeued job
        # started over
        callbacks.append(ModelCheckpoint(save_last="link", save_top_k=1, every_n_epochs=1))
    return {"strategy": strategy, "callbacks": callbacks}
