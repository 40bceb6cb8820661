"""Bit casts for the numba kernels: bfloat16 and float16 widened and rounded in registers, and
replicas passed by address.

numba has no scalar ``view`` and no float16 arithmetic, so a kernel that widened bfloat16 went
through a scratch array (write the shifted bits, read them back as float32): a store and a load
per element and replica. These intrinsics are LLVM ``bitcast`` instructions (free in registers)
and, for float16, ``fpext`` / ``fptrunc`` (one conversion instruction per vector where the CPU
has them: :func:`float16_in_hardware`), so the widen-and-add and the divide-and-round loops are
one vectorised pass each. The kernels take their K replicas as an array of data addresses
(:func:`array_at`): a numba typed list of arrays would compile its own methods in every new
process, 0.2-0.5 s for each element type, where the kernels themselves load from numba's cache.
Importing this module needs numba.

    >>> import numpy as np
    >>> from numba import njit
    >>> @njit
    ... def round_trip(bits):
    ...     return to_bfloat16_bits(widen_bfloat16(bits))
    >>> hex(round_trip(np.int16(0x3FC0)))  # 1.5 in bfloat16
    '0x3fc0'
    >>> @njit
    ... def third(bits):
    ...     return to_float16_bits(widen_float16(bits) / np.float32(3.0))
    >>> hex(third(np.uint16(0x3C00))) if float16_in_hardware() else '0x3555'  # 1/3 in float16
    '0x3555'
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import binding, ir
from numba import carray, njit, types
from numba.core import config
from numba.extending import intrinsic

__all__ = [
    "JIT_OPTIONS",
    "array_at",
    "float16_in_hardware",
    "float32_bits",
    "float32_from_bits",
    "to_bfloat16_bits",
    "to_float16_bits",
    "widen_bfloat16",
    "widen_float16",
]

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


def float16_in_hardware() -> bool:
    """Whether the CPU numba compiles for converts float16 to and from float32 in hardware
    (x86 with F16C, any 64-bit ARM). Elsewhere LLVM lowers the conversions to library calls that
    numba's JIT does not link (a generic x86-64 target crashed), so the float16 kernels are
    used only where this holds."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    features = config.CPU_FEATURES
    if features is None:
        features = binding.get_host_cpu_features().flatten()
    return "+f16c" in features.split(",")


@intrinsic
def widen_float16(typingctx, bits):  # pragma: no cover - compiled
    """The float32 value of a float16 given as its uint16 bit pattern (exact: ``fpext``)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def to_float16_bits(typingctx, value):  # pragma: no cover - compiled
    """The float16 bit pattern (uint16) of the float32 ``value``, rounded to nearest even
    (``fptrunc``: the instruction torch's ``copy_`` uses on such CPUs; NaN stays NaN)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _pointer(typingctx, address):  # pragma: no cover - compiled
    """The integer ``address`` as a ``void *``."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(address), codegen


@njit(inline="always", **JIT_OPTIONS)
def array_at(address, numel, like):  # pragma: no cover - compiled
    """The 1-D array of ``numel`` elements of ``like``'s dtype at ``address`` (no copy); the
    caller keeps the memory alive and checks that it holds that many."""
    return carray(_pointer(address), numel, like.dtype)
