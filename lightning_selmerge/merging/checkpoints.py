"""Out-of-core merge of saved checkpoints into a Hugging Face style directory."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .alignment import check_same_names, copy_exact
from .errors import MergeError
from .finite import NonFinite, all_finite, check_nonfinite_mode
from .kernels.dispatch import merge_size
from .leftovers import backup_path, recover_output, staging_path
from .methods import MergeMethod
from .plan import MergePlan, merge_dropping_nonfinite, prepare_tensor
from .rules import MergeRule
from .safetensors_io import (
    CheckpointReader,
    ShardedSafetensorsWriter,
    TensorInfo,
    floating_nbytes,
)
from .scratch import scratch_scope
from .side_files import copy_side_files, side_file_sources
from .snapshot_records import check_listed_order
from .tensor_merge import DEFAULT_CHUNK_NUMEL, iter_merged_chunks

__all__ = [
    "MergeProgress",
    "check_base_checkpoint",
    "claim_output",
    "merge_checkpoints",
    "publish_directory",
    "staged_output",
]

PROVENANCE_NAME = "selmerge.json"
#: ``progress(done_bytes, total_bytes)``: the merged output's bytes written so far and in all.
MergeProgress = Callable[[int, int], object]


def _aligned_infos(
    readers: Sequence[CheckpointReader], labels: Sequence[str]
) -> list[tuple[str, TensorInfo]]:
    check_same_names([set(reader.names()) for reader in readers], labels)
    names = readers[0].names()
    for label, reader in zip(labels[1:], readers[1:]):
        for name in names:
            mine, theirs = readers[0].info(name), reader.info(name)
            if mine != theirs:
                raise MergeError(
                    f"tensor {name!r}: {theirs.dtype} {theirs.shape} in {label} but {mine.dtype} "
                    f"{mine.shape} in {labels[0]}: the checkpoints must share architecture and "
                    "dtype (save them in one dtype, e.g. model.to(torch.bfloat16).save_pretrained)"
                )
    return [(name, readers[0].info(name)) for name in names]


def publish_directory(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging directory to ``out`` (replacing it only with ``overwrite``).

    An existing ``out`` is first renamed to a backup beside it and removed once the new one is in
    place; if that second rename fails, the backup is renamed back, so ``out`` is never lost. A
    process killed between the two renames leaves the backup ``.OUT.old-S`` and the complete
    ``.OUT.tmp-S`` (``staging`` from :func:`staging_path`): the next run's
    :func:`recover_output` finishes the swap.
    """
    if out.exists():
        if not overwrite:
            raise MergeError(f"output {out} appeared during the merge; nothing was replaced")
        backup = backup_path(staging, out)
        os.replace(out, backup)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(backup, out)
            raise
        if backup.is_dir():
            shutil.rmtree(backup, ignore_errors=True)
        else:  # an output path that held a file
            backup.unlink(missing_ok=True)
    else:
        os.replace(staging, out)


def _find_nonfinite_files(
    readers: Sequence[CheckpointReader], infos: Sequence[tuple[str, TensorInfo]]
) -> dict[int, str]:
    """Replica index -> its first floating-point tensor holding NaN/Inf (one read pass)."""
    found: dict[int, str] = {}
    for index, reader in enumerate(readers):
        for name, info in infos:
            if info.dtype.is_floating_point and not all_finite(reader.tensor(name)):
                found[index] = name
            reader.release(name)
            if index in found:
                break
    return found


def check_shard_size(max_shard_bytes: int) -> None:
    """Refuse a shard size that is not a positive number of bytes."""
    if max_shard_bytes < 1:
        raise MergeError(
            f"max_shard_bytes (--shard_size) must be a positive number of bytes, got "
            f"{max_shard_bytes} (default 5 GiB: {5 * 2**30})"
        )


def claim_output(
    out: Path, overwrite: bool, replicas: Sequence[str | Path] = (), base: Any = None
) -> None:
    """Recover what a killed merge into ``out`` left behind; refuse an existing ``out`` unless
    ``overwrite``, and an ``out`` that is, holds or sits inside a replica or the base (a path;
    replacing it would delete an input)."""
    where = out.resolve()
    inputs = [*replicas, *([base] if isinstance(base, (str, Path)) else [])]
    for given in map(Path, inputs):
        source = given.resolve()
        if where == source or where in source.parents or source in where.parents:
            relation = (
                "is" if where == source else "holds" if where in source.parents else "is inside"
            )
            raise MergeError(
                f"output {out} {relation} the input {given}: writing it would replace or mix "
                "with an input; choose an output path outside the inputs"
            )
    recover_output(out)
    if out.exists() and not overwrite:
        raise MergeError(
            f"output {out} already exists: choose another path or pass overwrite=True "
            "(CLI: --overwrite)"
        )


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh staging directory beside ``out``, published as ``out`` when the block ends well.

    On any error it is removed, and an :class:`OSError` is raised again saying that ``out`` is
    unchanged (or that nothing was written), so no partial output is ever left.
    """
    staging = staging_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        yield staging
        publish_directory(staging, out, overwrite)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            state = f"{out} is unchanged" if out.exists() else f"nothing was written to {out}"
            message = (
                f"merging into {out} failed: {err.strerror or err}"
                f"{f' ({err.filename})' if err.filename else ''}; the partial output was "
                f"removed and {state}"
            )
            # OSError(None, message) would print "[Errno None] ..."
            wrapped = OSError(message) if err.errno is None else OSError(err.errno, message)
            raise wrapped from err
        raise


def check_base_checkpoint(
    plan: MergePlan,
    infos: Sequence[tuple[str, TensorInfo]],
    base_infos: Mapping[str, TensorInfo] | None,
    base: str | Path | None,
) -> None:
    """Every tensor whose method needs the base is in the base checkpoint (``base_infos``, read
    from ``base``; ``None`` when none is given) with the replicas' dtype and shape."""
    for name, info in infos:
        if not info.dtype.is_floating_point:
            continue
        found = plan.base_for(name, base_infos, "--base / base=<pre-trained checkpoint>")
        if found is not None and found != info:
            raise MergeError(
                f"tensor {name!r} has another shape or dtype in the base checkpoint {base}: "
                f"{found.dtype} {found.shape} there, {info.dtype} {info.shape} in the replicas "
                "(save the base in the replicas' dtype: model.to(dtype).save_pretrained)"
            )


def merge_checkpoints(
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
) -> Path:
    """Merge K saved checkpoints into one Hugging Face style directory, one tensor at a time.

    Inputs are ``.safetensors`` files or model directories (``model.safetensors`` or sharded with
    ``model.safetensors.index.json``), read through memory maps. The output directory gets sharded
    safetensors (plus the index when there are several shards), the config, tokenizer and other
    small files of ``base`` (of the first replica when ``base`` is a single file or a directory
    without them), and ``selmerge.json`` describing the
    merge. It is written under a temporary name beside ``out`` and renamed when complete, so a
    crash or an error (a full disk included) leaves no partial output and an existing ``out``
    unchanged. The result equals :func:`merge_state_dicts` on the loaded tensors with the same
    arguments.

    Args:
        progress: called after each tensor with the bytes of merged output written so far and
            the output's total bytes (e.g. to update a progress bar); a merge that starts over
            (``nonfinite="drop"``) starts counting from 0 again.
        nonfinite: as in :func:`merge_state_dicts`: a replica holding NaN/Inf raises
            :class:`NonFiniteError` naming the replica's path and the tensor (``"error"``), or
            is left out (``"drop"``; the merge then starts over without it, and ``selmerge.json``
            lists it under ``"dropped_nonfinite"``).

    Raises:
        MergeError: bad inputs (nothing is written).
        OSError: reading or writing failed (e.g. no space left); the message names ``out`` and
            says that nothing was left behind.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from safetensors.torch import save_file, load_file
        >>> tmp = Path(tempfile.mkdtemp())
        >>> for k in range(2):
        ...     save_file({"w": torch.full((3,), float(k))}, tmp / f"r{k}.safetensors")
        >>> from lightning_selmerge.merging import WeightedAverage
        >>> out = merge_checkpoints([tmp / "r0.safetensors", tmp / "r1.safetensors"], tmp / "m",
        ...                         method=WeightedAverage())
        >>> load_file(out / "model.safetensors")["w"]
        tensor([0.5000, 0.5000, 0.5000])
    """
    out = Path(out)
    check_nonfinite_mode(nonfinite)
    check_shard_size(max_shard_bytes)
    plan = MergePlan.create(method, rules, seed, len(replicas))
    check_listed_order(replicas)
    claim_output(out, overwrite, replicas, base)
    labels = [f"replica {k} ({path})" for k, path in enumerate(replicas)]

    with ExitStack() as stack:
        stack.enter_context(scratch_scope())
        readers = [CheckpointReader(path) for path in replicas]
        for reader in readers:
            stack.callback(reader.close)
        infos = _aligned_infos(readers, labels)
        plan.warn_unmatched_rules(name for name, _ in infos)
        base_reader = None
        if base is not None:
            base_reader = CheckpointReader(base)
            stack.callback(base_reader.close)
        base_infos = None
        if base_reader is not None:
            base_infos = {name: base_reader.info(name) for name in base_reader.names()}
        check_base_checkpoint(plan, infos, base_infos, base)
        job = _MergeJob(
            out=out,
            infos=infos,
            base_reader=base_reader,
            side_files=side_file_sources(base, replicas[0]),
            chunk_numel=chunk_numel,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            progress=progress,
            provenance={
                "method": repr(plan.method),
                "rules": [{"pattern": r.pattern, "method": repr(r.method)} for r in rules],
                "seed": seed,
                "replicas": [str(p) for p in replicas],
                "base": None if base is None else str(base),
                "streaming": False,
            },
        )
        found_bad: dict[int, str] = {}

        def find_bad() -> dict[int, str]:
            found_bad.update(_find_nonfinite_files(readers, infos))
            return found_bad

        def attempt(plan: MergePlan, keep: Sequence[int]) -> None:
            if found_bad:
                job.provenance["replicas"] = [str(replicas[k]) for k in keep]
                job.provenance["method"] = repr(plan.method)
                job.provenance["dropped_nonfinite"] = [
                    {"replica": k, "path": str(replicas[k]), "tensor": name}
                    for k, name in found_bad.items()
                ]
            job.run([readers[k] for k in keep], [labels[k] for k in keep], keep, plan)

        merge_dropping_nonfinite(
            plan, attempt, nonfinite=nonfinite, labels=labels, find_bad=find_bad
        )
    return out


@dataclass
class _MergeJob:
    """One attempt at writing the merge: into a staging directory, renamed to ``out`` at the end."""

    out: Path
    infos: Sequence[tuple[str, TensorInfo]]
    base_reader: CheckpointReader | None
    side_files: list[Path]
    chunk_numel: int
    max_shard_bytes: int
    overwrite: bool
    progress: MergeProgress | None
    provenance: dict[str, Any]

    def run(
        self,
        readers: Sequence[CheckpointReader],
        labels: Sequence[str],
        indices: Sequence[int],
        plan: MergePlan,
    ) -> None:
        with (
            staged_output(self.out, self.overwrite) as staging,
            merge_size(len(readers) * floating_nbytes(self.infos)),
        ):
            self._write(staging, readers, labels, indices, plan)

    def _write(
        self,
        staging: Path,
        readers: Sequence[CheckpointReader],
        labels: Sequence[str],
        indices: Sequence[int],
        plan: MergePlan,
    ) -> None:
        writer = ShardedSafetensorsWriter(
            staging,
            self.infos,
            max_shard_bytes=self.max_shard_bytes,
            metadata={"merged_by": "lightning_selmerge"},
        )
        try:
            base_reader = self.base_reader
            total = sum(info.nbytes for _, info in self.infos)
            done = 0
            for name, info in self.infos:
                tensors = [reader.tensor(name) for reader in readers]
                if info.numel == 0:
                    writer.write(name, tensors[0])
                elif not info.dtype.is_floating_point:
                    writer.write(name, copy_exact(name, tensors, labels))
                else:
                    chosen = plan.method_for(name)
                    base_tensor = base_reader.tensor(name) if chosen.needs_base else None
                    start = 0
                    chunks = iter_merged_chunks(
                        name,
                        tensors,
                        base_tensor,
                        chosen,
                        plan.rng,
                        chunk_numel=self.chunk_numel,
                        check_finite_as=labels,
                        indices=indices,
                        reuse_buffer=True,  # each chunk is written out before the next
                        prepared=prepare_tensor(
                            chosen, name, tensors, base_tensor, self.chunk_numel
                        ),
                    )
                    for chunk in chunks:
                        writer.write(name, chunk)
                        # Merged input pages leave the resident set chunk by chunk, so peak
                        # memory is bounded by the chunk size, not by the largest tensor.
                        stop = start + chunk.numel()
                        for reader in readers if base_tensor is None else [*readers, base_reader]:
                            reader.release(name, start, stop)
                        start = stop
                del tensors
                for reader in readers:
                    reader.release(name)
                done += info.nbytes
                if self.progress is not None:
                    self.progress(done, total)
            writer.close()
        finally:
            writer.abort()
        copy_side_files(self.side_files, staging)
        text = json.dumps(self.provenance, indent=2) + "\n"
        (staging / PROVENANCE_NAME).write_text(text)
