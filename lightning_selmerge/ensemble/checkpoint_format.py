"""The ensemble's checkpoint format: one file on one rank, a directory of per-rank files on
several.

On one rank the checkpoint is Lightning's, with the ensemble's state under
:data:`CHECKPOINT_KEY`; a local one is written atomically (:func:`save_atomic`). On several
ranks it is a directory (:func:`save_rank_directory`): ``checkpoint.pt`` (rank 0's Lightning
checkpoint) and one ``rank_{r:05d}.pt`` per rank with that rank's slices of its replicas,
staged under a temporary name and renamed when every rank is done.

This is a plain module, not a Lightning ``CheckpointIO`` plugin: Lightning calls a plugin on
global rank 0 only, with no collectives, while the directory needs every rank's file and two
barriers; and a single-file checkpoint to a remote path goes through the user's own
``checkpoint_io``, which a plugin of ours would replace.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
    >>> save_atomic({"epoch": 1}, path)
    >>> torch.load(path)["epoch"]
    1
    >>> rank_file(Path("step=3.ckpt"), 1).name
    'rank_00001.pt'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_selmerge.ensemble.device_groups import ReplicaLayout
from lightning_selmerge.merging.checkpoints import publish_directory
from lightning_selmerge.merging.leftovers import clean_stale_files, recover_output, staging_path

__all__ = [
    "CHECKPOINT_KEY",
    "check_compatible",
    "rank_file",
    "resume_state",
    "save_atomic",
    "save_rank_directory",
]

#: checkpoint key of the ensemble's own state (replicas, initial weights, RNG, active replica)
CHECKPOINT_KEY = "data_order_ensemble"


def rank_file(directory: Path, rank: int) -> Path:
    """Rank ``rank``'s file in a per-rank checkpoint directory."""
    return directory / f"rank_{rank:05d}.pt"


def resume_state(saved: dict[str, Any], path: Path, rank: int) -> dict[str, Any]:
    """The ensemble state that rank ``rank`` resumes from: its rank file's in a per-rank
    directory ``path``, else ``saved`` (the single-file checkpoint's ``CHECKPOINT_KEY``)."""
    if saved.get("per_rank_files"):
        return torch.load(rank_file(path, rank), map_location="cpu", weights_only=False)
    return saved


def save_atomic(obj: Any, path: Path, clean: bool = True) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename onto ``path``.

    A process killed at any point leaves the previous file intact (Lightning's own atomic save
    stages in ``$TMPDIR``, which is a copy, not a rename, across filesystems). ``clean``: first
    remove the unfinished saves of killed runs in ``path``'s directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        clean_stale_files(path.parent, once=True)
    tmp = staging_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_rank_directory(
    strategy: ParallelStrategy,
    checkpoint: dict[str, Any],
    filepath: _PATH,
    ensemble_state: Callable[[], dict[str, Any]] | None,
    identity: Mapping[str, Any],
) -> None:
    """Save a checkpoint of several ranks as a directory (a collective: call on every rank).

    ``ensemble_state``: this rank's state for its rank file (``None`` for a weights-only
    checkpoint, which has no rank files); ``identity``: what a resume must match, recorded in
    ``checkpoint.pt``. The previous checkpoint at ``filepath`` stays until this one is complete.
    """
    where = str(strategy.broadcast(str(filepath)))
    if "://" in where:
        raise MisconfigurationException(
            f"DataOrderEnsemble: cannot save the checkpoint {where!r}: on several ranks a "
            "checkpoint is a directory of per-rank files, staged under a temporary name and "
            "renamed, which needs a local (or mounted) filesystem path; save to a local "
            "path (e.g. ModelCheckpoint(dirpath='checkpoints')) and copy it to remote "
            "storage afterwards."
        )
    path = Path(where)
    if strategy.is_global_zero:
        recover_output(path)  # what a killed save of this checkpoint left behind
    staging = Path(strategy.broadcast(str(staging_path(path))))
    staging.mkdir(parents=True, exist_ok=True)
    if ensemble_state is not None:
        # staging is this save's own new directory: the other ranks' files there are at work
        save_atomic(ensemble_state(), rank_file(staging, strategy.global_rank), clean=False)
        checkpoint[CHECKPOINT_KEY] = {
            **identity,
            "world_size": strategy.world_size,
            "per_rank_files": True,
        }
    if strategy.is_global_zero:
        save_atomic(checkpoint, staging / "checkpoint.pt", clean=False)
    strategy.barrier()
    if strategy.is_global_zero:  # the previous checkpoint stays until this one is complete
        publish_directory(staging, path, overwrite=True)
    strategy.barrier()


def check_compatible(
    saved: Mapping[str, Any],
    path: _PATH,
    layout: ReplicaLayout,
    shard_size: int,
    settings: Mapping[str, Any],
) -> None:
    """Refuse to resume from ``saved`` (a checkpoint's :data:`CHECKPOINT_KEY` entry) with
    another replica layout, or other ``settings`` (``num_replicas``, ``seed``,
    ``fixed_batches``) than the strategy's."""
    saved_layout = saved.get("layout", {"replica_groups": 1, "shard_size": 1})
    if (saved_layout["replica_groups"], saved_layout["shard_size"]) != (
        layout.replica_groups,
        shard_size,
    ):
        raise MisconfigurationException(
            f"DataOrderEnsemble: the checkpoint {Path(str(path)).name} was saved by "
            f"{saved_layout['replica_groups']} replica group(s) x shard_size="
            f"{saved_layout['shard_size']} but this run has {layout.replica_groups} x "
            f"shard_size={shard_size}; resume with the same devices x num_nodes and shard_size "
            "(or start a new fit from the checkpoint's merged model: its state_dict)."
        )
    for name, value in settings.items():
        if saved[name] != value:
            raise MisconfigurationException(
                f"DataOrderEnsemble: the checkpoint {Path(str(path)).name} was saved with "
                f"{name}={saved[name]!r} but this strategy has {name}="
                f"{value!r}; resume with DataOrderEnsemble({name}="
                f"{saved[name]!r}, ...) or start a new fit without ckpt_path."
            )
