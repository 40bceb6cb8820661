"""Memory-mapped reading and streaming, sharded writing of safetensors checkpoints.

The reader maps a file and hands out zero-copy tensor views; :meth:`SafetensorsFile.release`
drops a tensor's pages from this process's resident memory once it has been merged, so a merge's
peak RSS stays near one tensor per input instead of the whole checkpoints. The writer knows every
output tensor's dtype and shape up front, writes each shard's header first and then streams the
tensors' bytes chunk by chunk. Both follow the safetensors format (8-byte little-endian header
length, JSON header, raw little-endian data); files written here load with ``safetensors``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MergeError

__all__ = [
    "CheckpointReader",
    "SafetensorsFile",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "floating_nbytes",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype and shape, as a checkpoint's header gives them."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def floating_nbytes(tensors: Iterable[tuple[str, TensorInfo]]) -> int:
    """The bytes of the floating-point tensors among ``(name, info)`` pairs: what one replica
    brings to a merge (see :func:`~.kernels.dispatch.merge_size`).

    Example:
        >>> floating_nbytes([("w", TensorInfo(torch.bfloat16, (3, 2))),
        ...                  ("step", TensorInfo(torch.int64, ()))])
        12
    """
    return sum(info.nbytes for _, info in tensors if info.dtype.is_floating_point)


_LFS_POINTER = b"version https://git-lfs"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives


def _header_length(path: Path, first: bytes, size: int) -> int:
    """The header length a ``.safetensors`` file declares in its first 8 bytes, checked against
    the file's ``size`` before anything that large is read (``first``: the file's first bytes,
    at least 8 when it has them). :class:`MergeError` naming ``path`` (and what the file looks
    like instead: a Git LFS pointer, a ``torch.save`` file) if it cannot be safetensors."""
    if first.startswith(_LFS_POINTER):
        raise MergeError(
            f"{path} is not a safetensors file: it looks like a Git LFS pointer (a small text "
            "file standing for the real weights); fetch the weights with `git lfs pull` (or "
            "download the file itself) and merge again"
        )
    if first.startswith(_ZIP_MAGIC):
        raise MergeError(
            f"{path} is not a safetensors file: it looks like a torch.save (zip) file; save the "
            "weights with safetensors (safetensors.torch.save_file, or save_pretrained(..., "
            "safe_serialization=True))"
        )
    if len(first) < 8:
        raise MergeError(
            f"{path} is not a safetensors file: it has {size} bytes, fewer than the 8-byte "
            "header length every safetensors file starts with"
        )
    (header_len,) = struct.unpack("<Q", first[:8])
    if header_len > size - 8:
        raise MergeError(
            f"{path} is not a safetensors file (or is truncated): its header length "
            f"{header_len} does not fit in a file of {size} bytes; check that it holds "
            "safetensors weights and save it again"
        )
    return header_len


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                header_len = _header_length(self.path, handle.read(len(_LFS_POINTER)), size)
                handle.seek(8)
                header = json.loads(handle.read(header_len))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
                data_bytes = size - 8 - header_len
                self._mmap = (
                    mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                    if data_bytes > 0
                    else None
                )
        except MergeError:
            raise
        except (OSError, struct.error, ValueError) as err:
            raise MergeError(f"{self.path} is not a readable safetensors file: {err}") from err
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._closed = False
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, entry in header.items():
            info, begin, end = self._parse_entry(name, entry)
            if not 0 <= begin <= end <= data_bytes:
                raise MergeError(
                    f"{self.path}: tensor {name!r} lies at bytes {begin}..{end} of a data "
                    f"section of {max(data_bytes, 0)} bytes: the file is truncated or corrupt; "
                    "save it again"
                )
            self._entries[name] = (info, begin, end)

    def _parse_entry(self, name: str, entry: object) -> tuple[TensorInfo, int, int]:
        """A header entry's dtype, shape and data offsets, checked against each other."""
        try:
            dtype_name = entry["dtype"]  # type: ignore[index]
            shape = tuple(entry["shape"])  # type: ignore[index]
            begin, end = entry["data_offsets"]  # type: ignore[index]
            valid = isinstance(dtype_name, str) and all(
                isinstance(v, int) and v >= 0 for v in (*shape, begin, end)
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise MergeError(
                f"{self.path}: tensor {name!r} has a malformed header entry {entry!r} (it needs "
                '"dtype", "shape" and "data_offsets"): the file is corrupt; save it again'
            )
        if dtype_name not in DTYPES:
            raise MergeError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
        info = TensorInfo(DTYPES[dtype_name], shape)
        if end - begin != info.nbytes:
            raise MergeError(
                f"{self.path}: tensor {name!r} ({dtype_name}, shape {list(shape)}) needs "
                f"{info.nbytes} bytes but its data_offsets span {end - begin}: the file is "
                "corrupt; save it again"
            )
        return info, begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor's bytes in the mapped file."""
        info, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._closed:
            raise ValueError(f"{self.path}: read tensor {name!r} after the reader was closed")
        flat = torch.frombuffer(
            self._mmap, dtype=info.dtype, count=info.numel, offset=self._data_start + begin
        )
        return flat.view(info.shape)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of flat elements ``start:stop`` of a tensor from this process's
        resident set (the file is untouched; a later read maps them in again)."""
        info, begin, end = self._entries[name]
        if self._mmap is None or end == begin:
            return
        size = info.nbytes // max(info.numel, 1)
        stop = info.numel if stop is None else stop
        page = mmap.PAGESIZE
        first = (self._data_start + begin + start * size) // page * page
        last = self._data_start + begin + stop * size
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Let go of the map: it is unmapped now, or when the last tensor view of it dies.

        Never ``mmap.close()``: ``torch.frombuffer`` views keep a reference to the map but no
        buffer export, so closing it would unmap memory that live views (a caller's, or those
        an exception's traceback holds) still point into, and reading them would crash.
        """
        self._mmap = None
        self._closed = True


def _directory_hint(path: Path) -> str:
    """What the directory holds instead, and what to do with it."""
    if (path / "adapter_model.safetensors").is_file():
        return (
            "; it is a PEFT adapter: fold each replica's adapter into its model "
            "(model.merge_and_unload(), then save_pretrained) and merge those (docs/lora.md), "
            "or merge the adapter_model.safetensors files themselves"
        )
    if any(path.glob("pytorch_model*.bin")):
        return (
            "; it holds pytorch_model*.bin: load it and save it again with safetensors "
            "(AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))"
        )
    return ""


class CheckpointReader:
    """A checkpoint as tensor names: a ``.safetensors`` file or a Hugging Face model directory
    (``model.safetensors``, or shards listed in ``model.safetensors.index.json``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        self._index: dict[str, Path] = {}  # a sharded checkpoint's index: name -> shard
        for file in self._weight_files():
            reader = self._files[file] = SafetensorsFile(file)
            for name in reader.names():
                if self._where.setdefault(name, file) != file and name not in self._index:
                    raise MergeError(
                        f"tensor {name!r} is in two shards of {self.path} "
                        f"({self._where[name].name}, {file.name}) and not in its index"
                    )
        for name, shard in self._index.items():  # the index says which shard holds a name
            if name not in self._files[shard].names():
                raise MergeError(
                    f"{self.path / INDEX_NAME} puts tensor {name!r} in {shard.name}, which does "
                    "not hold it: the checkpoint is incomplete or its index is stale"
                )
            self._where[name] = shard

    def _weight_files(self) -> list[Path]:
        path = self.path
        if not path.exists():
            raise MergeError(f"checkpoint {path} does not exist")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise MergeError(
                    f"{path} is not a .safetensors file: save checkpoints with safetensors "
                    "(save_pretrained(..., safe_serialization=True) or safetensors.torch.save_file)"
                )
            return [path]
        index = path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise MergeError(f"{index} is not a valid safetensors index: {err}") from err
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise MergeError(
                    f"{index} is not a valid safetensors index: its weight_map must map tensor "
                    'names to shard files, e.g. {"lm_head.weight": "model-00002-of-00002.'
                    'safetensors"}'
                )
            self._index = {name: path / shard for name, shard in weight_map.items()}
            files = sorted(set(self._index.values()))
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise MergeError(f"{index} lists shards that are missing: {missing}")
            return files
        if (path / SINGLE_NAME).is_file():
            return [path / SINGLE_NAME]
        raise MergeError(
            f"no safetensors weights in directory {path}: expected {SINGLE_NAME} or "
            f"{INDEX_NAME}{_directory_hint(path)}"
        )

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._files[self._where[name]].info(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].tensor(name)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self._files[self._where[name]].release(name, start, stop)

    def close(self) -> None:
        for reader in self._files.values():
            reader.close()


def _shard_plan(
    tensors: Sequence[tuple[str, TensorInfo]], max_shard_bytes: int
) -> list[list[tuple[str, TensorInfo]]]:
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in tensors:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


def _header(tensors: Iterable[tuple[str, TensorInfo]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, info in tensors:
        header[name] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Writes tensors, in the planned order, into Hugging Face style shards plus an index.

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors``
    with ``model.safetensors.index.json``. Call :meth:`write` with each tensor's bytes in planned
    order (in as many pieces as you like), then :meth:`close`.
    """

    def __init__(
        self,
        directory: str | Path,
        tensors: Sequence[tuple[str, TensorInfo]],
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._metadata = {"format": "pt", **(metadata or {})}
        self._shards = _shard_plan(tensors, max_shard_bytes)
        count = len(self._shards)
        self.file_names = (
            [SINGLE_NAME]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [
            (name, info, shard) for shard, items in enumerate(self._shards) for name, info in items
        ]
        self._position = 0
        self._remaining = self._order[0][1].nbytes if self._order else 0
        self._shard = -1
        self._handle = None
        if not self._order:
            self._open_shard(0)

    def _open_shard(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        self._shard = shard
        self._handle = open(self.directory / self.file_names[shard], "wb")  # noqa: SIM115
        self._handle.write(_header(self._shards[shard], self._metadata))

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next bytes of tensor ``name`` (a contiguous chunk in its dtype)."""
        if self._position >= len(self._order) or self._order[self._position][0] != name:
            expected = (
                self._order[self._position][0] if self._position < len(self._order) else "nothing"
            )
            raise MergeError(f"writer expected tensor {expected!r} next, got {name!r}")
        _, info, shard = self._order[self._position]
        if chunk.dtype != info.dtype:
            raise MergeError(f"tensor {name!r}: writing {chunk.dtype}, planned {info.dtype}")
        if shard != self._shard:
            self._open_shard(shard)
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() > self._remaining:
            raise MergeError(f"tensor {name!r}: more bytes written than its shape holds")
        self._handle.write(memoryview(data.numpy()))
        self._remaining -= data.numel()
        if self._remaining == 0:  # this tensor is complete (an empty one by this very call)
            self._position += 1
            if self._position < len(self._order):
                self._remaining = self._order[self._position][1].nbytes

    def close(self) -> None:
        """Finish the last shard (fsync) and write the index when there are several shards."""
        if self._position < len(self._order):
            raise MergeError(
                f"writer closed before tensor {self._order[self._position][0]!r} was written"
            )
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        if len(self.file_names) > 1:
            weight_map = {name: self.file_names[shard] for name, _, shard in self._order}
            total = sum(info.nbytes for _, info, _ in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
