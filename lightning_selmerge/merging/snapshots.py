"""Merge the replica snapshots of one epoch directory (:mod:`~.snapshot_records` finds and checks
them), one replica at a time with the streaming file merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .accumulators import without_streaming_form
from .errors import MergeError
from .methods import MergeMethod, ParameterSelection
from .rules import MergeRule
from .snapshot_records import EpochSnapshots, find_epoch_snapshots, read_record
from .streaming_files import merge_checkpoints_streaming

__all__ = ["merge_by_path_hint", "merge_epoch"]


def _snapshot_base(base: Any) -> Any:
    """``SNAPSHOT_DIR/initial`` as the jobs wrote it: the directory, or ``initial.safetensors``
    when the snapshots are files (the merge command a replica job prints names ``initial``)."""
    if not isinstance(base, (str, Path)) or Path(base).exists():
        return base
    file = Path(base).with_name(Path(base).name + ".safetensors")
    return file if file.is_file() else base


def _check_base(found: EpochSnapshots, base: Any) -> None:
    """Refuse a ``base`` snapshot recording other initial weights than the replicas'."""
    if found.initial_fingerprint is None or not isinstance(base, (str, Path)):
        return
    recorded = (read_record(base) or {}).get("initial_fingerprint")
    if recorded is not None and recorded != found.initial_fingerprint:
        raise MergeError(
            f"--base {base} holds the initial weights of another run ({recorded}) than the "
            f"replicas of {found.epoch_dir} started from ({found.initial_fingerprint}): give "
            "the base their jobs wrote (SNAPSHOT_DIR/initial)"
        )


def merge_by_path_hint(epoch_dir: str | Path) -> str:
    """How to merge an epoch's snapshots all at once, for the errors that need it."""
    return (
        "merge the snapshots by path instead (merge_checkpoints, or lightning-selmerge merge "
        f"{epoch_dir}/replica_000 {epoch_dir}/replica_001 ... --streaming false)"
    )


def merge_epoch(
    epoch_dir: str | Path,
    out: str | Path,
    *,
    num_replicas: int | None = None,
    allow_missing: bool = False,
    method: MergeMethod | None = None,
    rules: Sequence[MergeRule] = (),
    **kwargs: Any,
) -> Path:
    """Merge the replica snapshots of one epoch directory with the streaming file merge.

    ``method`` and ``rules`` take per-replica weights or probabilities for all K replicas; with
    ``allow_missing`` those of the present replicas are kept (renormalised). Other keyword
    arguments go to :func:`~.streaming_files.merge_checkpoints_streaming` (``base``, ``seed``,
    ``overwrite``, ``nonfinite``, ...). A ``draw_prefix`` in the records (e.g. ``"model."``,
    written by a replica job whose snapshots drop the module's prefix) keys the draws unless
    ``draw_prefix`` is given. ``selmerge.json`` in ``out`` records the epoch directory, the
    replicas merged and those missing.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from safetensors.torch import save_file
        >>> epoch = Path(tempfile.mkdtemp()) / "epoch_000"
        >>> epoch.mkdir()
        >>> for k in range(3):
        ...     save_file({"w": torch.full((2,), float(k))}, epoch / f"replica_{k:03d}.safetensors")
        >>> merge_epoch(epoch, epoch.parent / "merged").name
        'merged'
    """
    found = find_epoch_snapshots(epoch_dir, num_replicas=num_replicas, allow_missing=allow_missing)
    if kwargs.get("base") is not None:
        kwargs["base"] = _snapshot_base(kwargs["base"])
    _check_base(found, kwargs.get("base"))
    present = sorted(found.paths)
    method = method if method is not None else ParameterSelection()
    unstreamable = without_streaming_form(method, rules)
    if unstreamable:
        raise MergeError(
            f"{unstreamable[0]} needs every replica at once, and an epoch merge reads one at a "
            f"time: {merge_by_path_hint(found.epoch_dir)}"
        )
    if found.missing:
        method.validate(found.num_replicas)
        method = method.subset(present)
        rules = [rule.subset(present) for rule in rules]
    if not kwargs.get("draw_prefix") and found.draw_prefix:
        kwargs["draw_prefix"] = found.draw_prefix
    return merge_checkpoints_streaming(
        [found.paths[k] for k in present],
        out,
        method=method,
        rules=rules,
        replica_indices=present,
        provenance={
            "epoch_dir": str(found.epoch_dir),
            "num_replicas": found.num_replicas,
            "merged_replicas": present,
            "missing_replicas": found.missing,
            **({"training_seed": found.seed} if found.seed is not None else {}),
            **({"epoch": found.epoch} if found.epoch is not None else {}),
        },
        **kwargs,
    )
