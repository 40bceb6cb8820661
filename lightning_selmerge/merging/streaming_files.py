"""Streaming merge of saved checkpoints: one replica file open at a time, memory flat in K.

Same inputs, output and guarantees as :func:`~lightning_selmerge.merging.merge_checkpoints` (and
the same bits), but the replicas are read one at a time in replica order (:mod:`.streaming`):
the tensors are merged in windows of at most ``window_bytes`` of merge state, and for each
window every replica is opened, its window's tensors fed and their pages released, and closed
before the next is opened (the base, when the method reads it, stays mapped for the window).
Memory: the window's state (output, float32 sums or selection candidates), whatever K is; at
most two memory maps are open at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (
    PROVENANCE_NAME,
    MergeProgress,
    check_base_checkpoint,
    check_shard_size,
    claim_output,
    staged_output,
)
from .errors import MergeError
from .finite import NonFinite, check_nonfinite_mode
from .methods import MergeMethod
from .plan import MergePlan, merge_dropping_nonfinite
from .rules import MergeRule
from .safetensors_io import CheckpointReader, ShardedSafetensorsWriter, TensorInfo
from .side_files import copy_side_files, side_file_sources
from .snapshot_records import check_listed_order
from .streaming import DEFAULT_WINDOW_BYTES, find_nonfinite_streaming, stream_merge
from .tensor_merge import DEFAULT_CHUNK_NUMEL

__all__ = ["merge_checkpoints_streaming", "read_plan"]


@contextmanager
def _open(path: str | Path) -> Iterator[CheckpointReader]:
    reader = CheckpointReader(path)
    try:
        yield reader
    finally:
        reader.close()


def _plan_of(path: str | Path) -> list[tuple[str, TensorInfo]]:
    with _open(path) as reader:
        return [(name, reader.info(name)) for name in reader.names()]


def read_plan(
    paths: Sequence[str | Path], labels: Sequence[str] | None = None
) -> list[tuple[str, TensorInfo]]:
    """The tensors (name, dtype, shape) the checkpoints share, read one header at a time.

    Raises :class:`MergeError` naming the first checkpoint whose tensor names, shapes or dtypes
    differ from the first one's, and the difference.
    """
    labels = list(labels) if labels is not None else [str(p) for p in paths]
    plan = _plan_of(paths[0])
    expected = dict(plan)
    for path, label in zip(paths[1:], labels[1:]):
        theirs = dict(_plan_of(path))
        missing = sorted(set(expected) - set(theirs))
        extra = sorted(set(theirs) - set(expected))
        if missing or extra:
            raise MergeError(
                f"{label} does not have the same tensors as {labels[0]}: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, extra "
                f"{extra[:5]}{'...' if len(extra) > 5 else ''}: the snapshots must be the same "
                "architecture"
            )
        for name, mine in plan:
            other = theirs[name]
            if other != mine:
                raise MergeError(
                    f"tensor {name!r}: {other.dtype} {list(other.shape)} in {label} but "
                    f"{mine.dtype} {list(mine.shape)} in {labels[0]}: the checkpoints must share "
                    "architecture and dtype"
                )
    return plan


def merge_checkpoints_streaming(
    replicas: Sequence[str | Path],
    out: str | Path,
    *,
    method: MergeMethod | None = None,
    base: str | Path | None = None,
    rules: Sequence[MergeRule] = (),
    seed: int = 0,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: MergeProgress | None = None,
    nonfinite: NonFinite = "error",
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    draw_prefix: str = "",
    replica_indices: Sequence[int] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """:func:`merge_checkpoints`, bit for bit, reading one replica at a time.

    Args:
        replicas, out, method, base, rules, seed, chunk_numel, max_shard_bytes, overwrite,
            progress, nonfinite: as in :func:`merge_checkpoints`.
        window_bytes: merge state held at once (outputs, sums, candidates); each replica is
            opened once per window.
        draw_prefix: prepended to tensor names to key the random draws (see
            :class:`~.streaming.StreamingMerge`).
        replica_indices: the replicas' indices in error messages and ``selmerge.json``
            (default ``0 .. K-1``; an epoch merge with missing replicas passes the present ones).
        provenance: extra entries for the output's ``selmerge.json``.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from safetensors.torch import save_file, load_file
        >>> from lightning_selmerge.merging import WeightedAverage
        >>> tmp = Path(tempfile.mkdtemp())
        >>> paths = [tmp / f"r{k}.safetensors" for k in range(3)]
        >>> for k, path in enumerate(paths):
        ...     save_file({"w": torch.full((2,), float(k))}, path)
        >>> out = merge_checkpoints_streaming(paths, tmp / "m", method=WeightedAverage())
        >>> load_file(out / "model.safetensors")["w"]
        tensor([1., 1.])
    """
    out = Path(out)
    check_nonfinite_mode(nonfinite)
    check_shard_size(max_shard_bytes)
    if not replicas:
        raise MergeError("no replicas to merge")
    plan = MergePlan.create(method, rules, seed, len(replicas))
    check_listed_order(replicas)
    claim_output(out, overwrite, replicas, base)
    indices = list(replica_indices) if replica_indices is not None else list(range(len(replicas)))
    if len(indices) != len(replicas):
        raise MergeError(f"{len(indices)} replica indices for {len(replicas)} replicas")
    labels = [f"replica {k} ({path})" for k, path in zip(indices, replicas)]
    tensors = read_plan(replicas, labels)
    plan = plan.with_rule_prefix(draw_prefix, (name for name, _ in tensors))
    plan.warn_unmatched_rules(name for name, _ in tensors)
    base_infos = None
    if base is not None:
        with _open(base) as reader:
            base_infos = {name: reader.info(name) for name in reader.names()}
    check_base_checkpoint(plan, tensors, base_infos, base)
    by_index = dict(zip(indices, replicas))
    record: dict[str, Any] = {
        "method": repr(plan.method),
        "rules": [{"pattern": r.pattern, "method": repr(r.method)} for r in rules],
        "seed": seed,
        "replicas": [str(p) for p in replicas],
        "base": None if base is None else str(base),
        "streaming": True,
        **({"draw_prefix": draw_prefix} if draw_prefix else {}),
        **(provenance or {}),
    }
    bad: dict[int, str] = {}  # replica index -> its first tensor holding NaN/Inf

    def find_bad() -> dict[int, str]:
        bad.update(find_nonfinite_streaming(lambda k: _open(by_index[k]), indices, tensors))
        return {indices.index(k): name for k, name in bad.items()}

    def attempt(plan: MergePlan, positions: Sequence[int]) -> None:
        keep = [indices[p] for p in positions]
        if bad:
            record["replicas"] = [str(by_index[k]) for k in keep]
            record["method"] = repr(plan.method)
            record["dropped_nonfinite"] = [
                {"replica": k, "path": str(by_index[k]), "tensor": name} for k, name in bad.items()
            ]
        with staged_output(out, overwrite) as staging:
            writer = ShardedSafetensorsWriter(
                staging,
                tensors,
                max_shard_bytes=max_shard_bytes,
                metadata={"merged_by": "lightning_selmerge"},
            )
            done, total = 0, sum(info.nbytes for _, info in tensors)

            def write(name: str, tensor: torch.Tensor) -> None:
                nonlocal done
                writer.write(name, tensor)
                done += tensor.numel() * tensor.element_size()
                if progress is not None:
                    progress(done, total)

            try:
                stream_merge(
                    tensors,
                    lambda k: _open(by_index[k]),
                    keep,
                    [labels[p] for p in positions],
                    write,
                    plan=plan,
                    open_base=None if base is None else lambda: _open(base),
                    chunk_numel=chunk_numel,
                    window_bytes=window_bytes,
                    draw_prefix=draw_prefix,
                )
                writer.close()
            finally:
                writer.abort()
            copy_side_files(side_file_sources(base, replicas[0]), staging)
            (staging / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n")

    merge_dropping_nonfinite(plan, attempt, nonfinite=nonfinite, labels=labels, find_bad=find_bad)
    return out
