"""Fused merge kernels: one pass over the replicas per chunk, bit-identical to the torch kernels.

Optional: numba (CPU) or triton (CUDA) compiles them at first use; without it every chunk takes
the torch kernels of :mod:`..methods`, which stay the reference. See :mod:`.dispatch` for the
choice.
"""

from .dispatch import (
    AUTO_MIN_REPLICA_BYTES,
    KERNELS_ENV,
    floating_bytes,
    fused_merge_chunk,
    kernel_setting,
    merge_size,
    use_kernels,
)
from .draws import NONFINITE_MASKS, DrawSpec

__all__ = [
    "AUTO_MIN_REPLICA_BYTES",
    "KERNELS_ENV",
    "NONFINITE_MASKS",
    "DrawSpec",
    "floating_bytes",
    "fused_merge_chunk",
    "kernel_setting",
    "merge_size",
    "use_kernels",
]
