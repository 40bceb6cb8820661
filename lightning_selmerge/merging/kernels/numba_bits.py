"""Bit casts for the numba kernels: bfloat16 widened and rounded in registers.

numba has no scalar ``view``, so a kernel that widened bfloat16 went through a scratch array
(write the shifted bits, read them back as float32): a store and a load per element and
replica. These two intrinsics are LLVM ``bitcast`` instructions (free in registers), so the
widen-and-add and the divide-and-round loops are one vectorised pass each. Importing this
module needs numba.

    >>> import numpy as np
    >>> from numba import njit
    >>> @njit
    ... def round_trip(bits):
    ...     return to_bfloat16_bits(widen_bfloat16(bits))
    >>> hex(round_trip(np.int16(0x3FC0)))  # 1.5 in bfloat16
    '0x3fc0'
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["JIT_OPTIONS", "float32_bits", "float32_from_bits", "to_bfloat16_bits", "widen_bfloat16"]

JIT_OPTIONS = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}


@intrinsic
def float32_from_bits(typingctx, bits):  # pragma: no cover - compiled
    """The float32 whose bit pattern is ``bits`` (an integer, taken as uint32: numba types
    ``uint32 << uint32`` as a 64-bit integer)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def float32_bits(typingctx, value):  # pragma: no cover - compiled
    """The bit pattern (uint32) of the float32 ``value``."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@njit(inline="always", **JIT_OPTIONS)
def widen_bfloat16(bits):  # pragma: no cover - compiled
    """The float32 value of a bfloat16 given as its int16 bit pattern (exact)."""
    return float32_from_bits(np.uint32(np.uint16(bits)) << np.uint32(16))


@njit(inline="always", **JIT_OPTIONS)
def to_bfloat16_bits(value):  # pragma: no cover - compiled
    """The bfloat16 bit pattern (uint16) of the float32 ``value``, rounded to nearest even as
    torch's ``copy_`` rounds; every NaN becomes ``0xFFFF``, as it does there."""
    x = float32_bits(value)
    rounded = np.uint16((x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> 16)
    nan = (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(0xFFFF) if nan else rounded
