"""Which chunks a fused kernel merges, and with which backend.

The torch kernels (:meth:`MergeMethod.merge_chunk`) are the reference and the fallback. A fused
kernel takes a chunk when one covers its method, dtype and device and its backend is installed:
numba on CPUs (``pip install numba``), triton on CUDA GPUs (``pip install triton``).
``SELMERGE_KERNELS`` (or :func:`use_kernels`) chooses: ``auto`` (the default: fused where
installed, except in a merge of less than :data:`AUTO_MIN_REPLICA_BYTES`, see
:func:`merge_size`), ``torch`` (never fused) or ``fused`` (fused where a kernel covers the
chunk, and an error when its backend is not installed).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.util import find_spec
from types import ModuleType

import torch

from ..errors import MergeError
from ..methods.average import WeightedAverage
from ..methods.base import ChunkContext, MergeMethod
from ..methods.selection import ParameterSelection
from ..methods.selection_kernel import bit_view
from .draws import NONFINITE_MASKS, DrawSpec

__all__ = [
    "AUTO_MIN_REPLICA_BYTES",
    "KERNELS_ENV",
    "floating_bytes",
    "fused_backend",
    "fused_merge_chunk",
    "kernel_setting",
    "merge_size",
    "use_kernels",
]

#: The environment variable that chooses the kernels: ``auto``, ``torch`` or ``fused``.
KERNELS_ENV = "SELMERGE_KERNELS"
_SETTINGS = ("auto", "torch", "fused")
_override: list[str] = []
#: ``auto`` leaves a merge of fewer replica bytes on the torch kernels: loading numba costs a
#: process 0.35 s and compiling a kernel 4-7 s the first time on a machine, more than the fused
#: kernels save on such a merge (docs/performance.md).
AUTO_MIN_REPLICA_BYTES = 1 << 30
#: The replica bytes of the outermost merge running in this thread (or task); None outside one.
_merge_bytes: ContextVar[int | None] = ContextVar("selmerge_merge_bytes", default=None)

#: The kernel modules whose import failed (with installed packages), and why: tried once.
_unimportable: dict[str, str] = {}
#: Per device type: the backend's module and the package it needs.
_BACKENDS = {"cpu": ("numba_cpu", "numba"), "cuda": ("triton_cuda", "triton")}
#: The dtypes the plain mean's kernels cover; a backend module may decline some on its host
#: (its ``HOST_UNCOVERED_MEAN_DTYPES``: float16 on a CPU without float16 conversions).
_MEAN_DTYPES = {
    "cpu": (torch.bfloat16, torch.float16, torch.float32),
    "cuda": (torch.bfloat16, torch.float16, torch.float32),
}


def kernel_setting() -> str:
    """``auto``, ``torch`` or ``fused``: from :func:`use_kernels`, else ``SELMERGE_KERNELS``."""
    setting = _override[-1] if _override else os.environ.get(KERNELS_ENV, "auto").lower()
    if setting not in _SETTINGS:
        raise MergeError(
            f"{KERNELS_ENV}={setting!r} is not a kernel setting: use one of {', '.join(_SETTINGS)}"
        )
    return setting


@contextmanager
def use_kernels(setting: str) -> Iterator[None]:
    """Merge with ``setting`` (``auto``, ``torch`` or ``fused``) inside the block.

    Example:
        >>> with use_kernels("torch"):
        ...     kernel_setting()
        'torch'
    """
    if setting not in _SETTINGS:
        raise MergeError(f"kernel setting {setting!r}: use one of {', '.join(_SETTINGS)}")
    _override.append(setting)
    try:
        yield
    finally:
        _override.pop()


@contextmanager
def merge_size(replica_bytes: int) -> Iterator[None]:
    """Inside the block a merge of ``replica_bytes`` (all K replicas' floating-point tensors)
    runs: with ``auto``, one of less than :data:`AUTO_MIN_REPLICA_BYTES` takes the torch
    kernels. The merge drivers say it; the outermost size counts; chunks merged outside any
    (``iter_merged_chunks`` or ``StreamingMerge`` called directly) count as a large merge's.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import WeightedAverage
        >>> with merge_size(1 << 20):
        ...     fused_backend(WeightedAverage(), torch.float32, "cpu") is None
        True
    """
    outer = _merge_bytes.get()
    token = _merge_bytes.set(replica_bytes if outer is None else outer)
    try:
        yield
    finally:
        _merge_bytes.reset(token)


def floating_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of the floating-point ``tensors`` (what :func:`merge_size` counts), tied ones
    (the same data, shape and dtype) once.

    Example:
        >>> emb = torch.zeros(4)
        >>> floating_bytes([emb, emb, torch.zeros(4, dtype=torch.int64)])
        16
    """
    seen = {
        (t.data_ptr(), t.numel(), t.dtype): t.numel() * t.element_size()
        for t in tensors
        if t.is_floating_point()
    }
    return sum(seen.values())


def _backend(device_type: str, setting: str, module_name: str | None) -> ModuleType | None:
    default_module, package = _BACKENDS.get(device_type, (None, None))
    if package is None:
        return None
    if find_spec(package) is None:
        if setting == "fused":
            raise MergeError(
                f"{KERNELS_ENV}=fused, but the fused {device_type} kernels need {package}, "
                f"which is not installed: pip install {package} (or unset {KERNELS_ENV})"
            )
        return None
    full_name = f"{__package__}.{module_name or default_module}"
    module = sys.modules.get(full_name)
    if module is None and full_name not in _unimportable:
        from importlib import import_module

        try:
            module = import_module(full_name)
        except ImportError as error:  # e.g. a numba built for another numpy
            _unimportable[full_name] = f"{type(error).__name__}: {error}"
            if setting != "fused":
                warnings.warn(
                    f"the fused {device_type} merge kernels are off: importing {package} failed "
                    f"({_unimportable[full_name]}); merging with the torch kernels (same bits, "
                    f"slower). Reinstall {package} to use them.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    if module is None:
        if setting == "fused":
            raise MergeError(
                f"{KERNELS_ENV}=fused, but the fused {device_type} kernels cannot be loaded: "
                f"{_unimportable[full_name]}. Reinstall {package} (or unset {KERNELS_ENV})."
            )
        return None
    return module


def _covered(method: MergeMethod, dtype: torch.dtype, device_type: str) -> bool:
    if type(method) is ParameterSelection:  # float8 has no NaN/Inf bit mask to check
        return dtype in NONFINITE_MASKS
    if type(method) is WeightedAverage and method.weights is None:
        return dtype in _MEAN_DTYPES.get(device_type, ())
    return False


def fused_backend(
    method: MergeMethod, dtype: torch.dtype, device_type: str, module_name: str | None = None
) -> ModuleType | None:
    """The kernels' module (``module_name`` of the device's backend, default its in-memory
    kernels) when a fused kernel covers ``method`` on ``dtype`` tensors of ``device_type`` and
    the setting allows it; else ``None``.

    Example:
        >>> with use_kernels("torch"):
        ...     fused_backend(ParameterSelection(), torch.bfloat16, "cpu") is None
        True
    """
    setting = kernel_setting()
    if setting == "torch" or sys.byteorder != "little":
        return None
    merge_bytes = _merge_bytes.get()
    if setting == "auto" and merge_bytes is not None and merge_bytes < AUTO_MIN_REPLICA_BYTES:
        return None
    if not _covered(method, dtype, device_type):
        return None
    backend = _backend(device_type, setting, module_name)
    declined = getattr(backend, "HOST_UNCOVERED_MEAN_DTYPES", ())
    if isinstance(method, WeightedAverage) and dtype in declined:
        return None
    return backend


def fused_merge_chunk(
    method: MergeMethod,
    ctx: ChunkContext,
    replicas: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    out: torch.Tensor,
) -> bool | None:
    """Merge the chunk into ``out`` with a fused kernel; ``None`` when none takes it (none
    covers it, or ``auto`` leaves this merge on the torch kernels: :func:`merge_size`; nothing
    written), else whether the chunk is finite where ``method``'s rule looks: the output for a
    method that :attr:`~MergeMethod.propagates_nonfinite`, else every input element.

    The chunks are contiguous 1-D tensors of one dtype on one device; the bits written are
    those of ``method.merge_chunk`` (a NaN output is NaN, its payload may differ).
    """
    first = replicas[0]
    if getattr(method, "resample", 0) > 0 and base is None:
        return None  # the torch kernel names what is missing
    if not all(t.is_contiguous() for t in (*replicas, out)):
        return None
    backend = fused_backend(method, first.dtype, first.device.type)
    if backend is None:
        return None
    if isinstance(method, WeightedAverage):
        return backend.mean_chunk(list(replicas), out)
    spec = DrawSpec.of(method, ctx, len(replicas))
    base_bits = bit_view(base) if method.resample > 0 else None
    mask = NONFINITE_MASKS[first.dtype]
    return backend.select_chunk(
        spec, [bit_view(r) for r in replicas], base_bits, bit_view(out), mask
    )
