"""Out-of-core merge of saved checkpoints into a Hugging Face style directory."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from .errors import MergeError
from .keyed_random import KeyedRandom
from .methods import MergeMethod, ParameterSelection
from .rules import MergeRule, method_for
from .safetensors_io import INDEX_NAME, CheckpointReader, ShardedSafetensorsWriter, TensorInfo
from .state_dict import DEFAULT_CHUNK_NUMEL, check_same_names, copy_exact, iter_merged_chunks

__all__ = ["merge_checkpoints", "publish_directory"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
PROVENANCE_NAME = "selmerge.json"


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
                    "dtype"
                )
    return [(name, readers[0].info(name)) for name in names]


def _copy_side_files(source: Path, target: Path) -> None:
    """Config, tokenizer and other small files of a model directory (not its weights)."""
    if not source.is_dir():
        return
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name != INDEX_NAME and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, target / item.name)


def publish_directory(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging directory to ``out`` (replacing it only with ``overwrite``)."""
    if out.exists():
        if not overwrite:
            raise MergeError(f"output {out} appeared during the merge; nothing was replaced")
        backup = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, backup)
        os.replace(staging, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, out)


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
    progress: Callable[[int], object] | None = None,
) -> Path:
    """Merge K saved checkpoints into one Hugging Face style directory, one tensor at a time.

    Inputs are ``.safetensors`` files or model directories (``model.safetensors`` or sharded with
    ``model.safetensors.index.json``), read through memory maps. The output directory gets sharded
    safetensors (plus the index when there are several shards), the config, tokenizer and other
    small files of ``base`` (else of the first replica), and ``selmerge.json`` describing the
    merge. It is written under a temporary name beside ``out`` and renamed when complete, so a
    crash or an error leaves no partial output. The result equals :func:`merge_state_dicts` on the
    loaded tensors with the same arguments.

    Args:
        progress: called with the number of tensors done after each tensor (e.g. a tqdm update).

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
    method = method if method is not None else ParameterSelection()
    for candidate in {id(m): m for m in [method, *(r.method for r in rules)]}.values():
        candidate.validate(len(replicas))
    if out.exists() and not overwrite:
        raise MergeError(f"output {out} already exists: choose another path or pass overwrite=True")
    labels = [f"replica {k} ({path})" for k, path in enumerate(replicas)]

    with ExitStack() as stack:
        readers = [CheckpointReader(path) for path in replicas]
        for reader in readers:
            stack.callback(reader.close)
        plan = _aligned_infos(readers, labels)
        base_reader = None
        if base is not None:
            base_reader = CheckpointReader(base)
            stack.callback(base_reader.close)
        for name, info in plan:
            if info.dtype.is_floating_point and method_for(name, rules, method).needs_base:
                if base_reader is None:
                    raise MergeError(
                        f"tensor {name!r}: selection with resample needs the base (pre-trained) "
                        "checkpoint: pass --base / base=..."
                    )
                if name not in base_reader or base_reader.info(name) != info:
                    raise MergeError(
                        f"tensor {name!r} is missing from the base checkpoint {base} or has "
                        "another shape or dtype there"
                    )

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            writer = ShardedSafetensorsWriter(
                staging,
                plan,
                max_shard_bytes=max_shard_bytes,
                metadata={"merged_by": "lightning_selmerge"},
            )
            rng = KeyedRandom(seed)
            for done, (name, info) in enumerate(plan, start=1):
                tensors = [reader.tensor(name) for reader in readers]
                if info.numel == 0:
                    writer.write(name, tensors[0])
                elif not info.dtype.is_floating_point:
                    writer.write(name, copy_exact(name, tensors, labels))
                else:
                    chosen = method_for(name, rules, method)
                    base_tensor = base_reader.tensor(name) if chosen.needs_base else None
                    start = 0
                    for chunk in iter_merged_chunks(
                        name, tensors, base_tensor, chosen, rng, chunk_numel=chunk_numel
                    ):
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
                if progress is not None:
                    progress(done)
            writer.close()
            _copy_side_files(Path(base if base is not None else replicas[0]), staging)
            provenance = {
                "method": repr(method),
                "rules": [{"pattern": r.pattern, "method": repr(r.method)} for r in rules],
                "seed": seed,
                "replicas": [str(p) for p in replicas],
                "base": None if base is None else str(base),
            }
            (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
            publish_directory(staging, out, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out
