"""Fused CPU kernels compiled by numba: one pass over the replicas per block of elements.

Each kernel walks the chunk in blocks of :data:`BLOCK` elements, split over numba's threads. A
block's hash words, draws and moved masks live in block-sized arrays that stay in the core's
cache, and every loop over a block is a plain loop over arrays that LLVM vectorises, so each
replica's block is read from memory once. What they compute is the torch kernels' bits:
selection copies bit patterns; the mean adds the float32-widened replicas in order into a
float32 sum (as into zeros), divides it by ``K`` and rounds to the dtype to nearest even, as
``acc.add_`` / ``div_`` / ``copy_`` do; the mean walks blocks (:data:`MEAN_BLOCK`,
:data:`MEAN_BLOCK_MANY`) in stripes and widens in registers (:mod:`.numba_bits`). Importing
this module needs numba; :mod:`.dispatch` imports it only when numba is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from ..keyed_random import UNIFORM_LEVELS
from .draws import DrawSpec
from .numba_bits import (
    JIT_OPTIONS,
    array_at,
    float16_in_hardware,
    to_bfloat16_bits,
    to_float16_bits,
    widen_bfloat16,
    widen_float16,
)

__all__ = [
    "BLOCK",
    "HOST_UNCOVERED_MEAN_DTYPES",
    "MEAN_BLOCK",
    "MEAN_BLOCK_MANY",
    "mean_array",
    "mean_chunk",
    "select_chunk",
]

#: Elements per block: a block's draws, choices and moved masks (13 bytes per element) and a
#: block of each replica stay in a core's L2 cache.
BLOCK = 4096

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
#: Elements per block of the mean with few replica bytes per element (K x itemsize <= 8): its
#: float32 sums (8 KiB) stay in L1 while the replicas pass.
MEAN_BLOCK = 2048
#: ... and with more: long runs of each replica keep the prefetchers streaming
#: (docs/performance.md).
MEAN_BLOCK_MANY = 16384
#: Contiguous runs of blocks a mean's chunk is split into over the threads (one sum buffer each).
STRIPES = 64
_BF16_EXPONENT = np.uint16(0x7F80)
_F16_EXPONENT = np.uint16(0x7C00)
#: The dtypes the dispatch lists for the mean that this CPU's kernels cannot take: float16 where
#: the CPU has no float16 conversions (:func:`.numba_bits.float16_in_hardware`).
HOST_UNCOVERED_MEAN_DTYPES: tuple[torch.dtype, ...] = (
    () if float16_in_hardware() else (torch.float16,)
)


@njit(inline="always", **JIT_OPTIONS)
def _hash_words(first_word, count, key):  # pragma: no cover - compiled
    """SplitMix64 of words ``first_word .. first_word + count`` under ``key``, as uint64."""
    words = np.empty(count, np.uint64)
    ukey = np.uint64(key)
    for w in range(count):
        x = np.uint64(first_word + w) * _GOLDEN + ukey
        x ^= x >> np.uint64(30)
        x *= _MUL1
        x ^= x >> np.uint64(27)
        x *= _MUL2
        x ^= x >> np.uint64(31)
        words[w] = x
    return words


@njit(inline="always", **JIT_OPTIONS)
def _block_lanes(key, first, count, lane_bits):  # pragma: no cover - compiled
    """The ``lane_bits``-bit lanes (uint8 or uint16 view) of elements ``first .. first+count``."""
    per_word = 64 // lane_bits
    first_word = first // per_word
    words = _hash_words(first_word, (first + count - 1) // per_word - first_word + 1, key)
    skip = first - first_word * per_word
    if lane_bits == 8:
        return words.view(np.uint8)[skip : skip + count].astype(np.uint16)
    return words.view(np.uint16)[skip : skip + count]


@njit(inline="always", **JIT_OPTIONS)
def draw_block(
    keys, first, m, candidates, num_replicas, lane_bits, bits, thresholds, even
):  # pragma: no cover - compiled
    """The ``[candidates, m]`` candidate replicas (uint8) of elements ``first .. first + m``,
    first to last (see :class:`.draws.DrawSpec`)."""
    chosen = np.empty((candidates, m), np.uint8)
    if thresholds.shape[0] == 0:
        lanes = _block_lanes(keys[0], first, m, lane_bits)
        group = np.uint16(num_replicas - 1)
        for j in range(candidates):
            shift = np.uint16(lane_bits - (j + 1) * bits)
            for i in range(m):
                chosen[j, i] = (lanes[i] >> shift) & group
        return chosen
    for j in range(candidates):
        uniforms = _block_lanes(keys[j], first, m, 16)
        if even:  # the thresholds are ceil(k * 2^16 / K): their count is u * K >> 16
            for i in range(m):
                chosen[j, i] = (np.uint32(uniforms[i]) * np.uint32(num_replicas)) >> 16
            continue
        for i in range(m):
            count = np.uint8(0)
            for t in range(thresholds.shape[0]):
                count += np.uint8(np.int32(uniforms[i]) >= thresholds[t])
            chosen[j, i] = count
    return chosen


@njit(parallel=True, **JIT_OPTIONS)
def _select(
    replicas, base, out, keys, start, candidates, lane_bits, bits, thresholds, even, word, nonfinite
):  # pragma: no cover - compiled
    """Selection (``candidates - 1`` resamples) into ``out``; whether no input was NaN/Inf.

    ``replicas``: the replicas' addresses (:func:`replica_addresses`); ``word``: an empty array
    of the unsigned type that holds an element's moved mask (K bits); ``even``: the
    ``thresholds`` are K equal shares."""
    n = out.shape[0]
    num_replicas = replicas.shape[0]
    mask = nonfinite[0]
    blocks = (n + BLOCK - 1) // BLOCK
    bad = np.zeros(blocks, np.uint8)
    for block in prange(blocks):
        lo = block * BLOCK
        hi = min(n, lo + BLOCK)
        m = hi - lo
        chosen = draw_block(
            keys, start + lo, m, candidates, num_replicas, lane_bits, bits, thresholds, even
        )
        if candidates == 1:
            choice = chosen[0]
        else:
            # bit k of moved[i]: replica k moved element i off the base
            one = np.ones(1, word.dtype)[0]
            zero = one ^ one
            moved = np.zeros(m, word.dtype)
            origin = base[lo:hi]
            for k in range(num_replicas):
                replica = array_at(replicas[k], n, out)[lo:hi]
                flag = one << np.full(1, k, word.dtype)[0]
                for i in range(m):
                    moved[i] |= flag if replica[i] != origin[i] else zero
            # the first candidate that moved; num_replicas (the base) when none did
            choice = np.full(m, np.uint8(num_replicas))
            for j in range(candidates - 1, -1, -1):
                for i in range(m):  # loads outside the condition, so that LLVM vectorises
                    option = chosen[j, i]
                    kept = choice[i]
                    choice[i] = option if (moved[i] >> option) & one else kept
        target = out[lo:hi]
        target[:] = base[lo:hi] if candidates > 1 else array_at(replicas[0], n, out)[lo:hi]
        found = False
        for k in range(num_replicas):
            replica = array_at(replicas[k], n, out)[lo:hi]
            index = np.uint8(k)
            if k > 0 or candidates > 1:  # without resample, target holds replica 0 already
                for i in range(m):
                    value, kept = replica[i], target[i]
                    target[i] = value if choice[i] == index else kept
            if mask != 0:
                for i in range(m):
                    found |= (replica[i] & mask) == mask
        bad[block] = found
    return not bad.any()


def half_bits(value, like):  # pragma: no cover - only its compiled overload runs
    """The float32 ``value`` rounded to nearest even to ``like``'s 16-bit type, as its bits in
    ``like``'s dtype (int16: bfloat16, uint16: float16)."""
    raise NotImplementedError


@overload(half_bits, inline="always", jit_options=JIT_OPTIONS)
def _half_bits(value, like):
    if like.dtype == types.int16:
        return lambda value, like: np.int16(to_bfloat16_bits(value))
    if like.dtype == types.uint16:
        return lambda value, like: to_float16_bits(value)
    return None


@njit(inline="always", **JIT_OPTIONS)
def divide_to_half(total, divisor, target, exponent):  # pragma: no cover - compiled
    """``target`` (a 16-bit view: :func:`half_bits`) = ``total / divisor``, rounded to nearest
    even as torch's ``div_`` and ``copy_`` do; whether a result is NaN/Inf (all the bits of
    ``exponent``, the dtype's exponent mask, set)."""
    worst = np.uint16(0)
    for i in range(total.shape[0]):
        rounded = half_bits(total[i] / divisor, target)
        target[i] = rounded
        worst = max(worst, np.uint16(rounded) & np.uint16(0x7FFF))
    return worst >= exponent


@njit(inline="always", **JIT_OPTIONS)
def divide_to_float32(total, divisor, target):  # pragma: no cover - compiled
    """``target`` = ``total / divisor`` (float32); whether a result is NaN/Inf."""
    found = False
    for i in range(total.shape[0]):
        value = total[i] / divisor
        target[i] = value
        found |= not np.isfinite(value)
    return found


def as_float32(x):  # pragma: no cover - only its compiled overload runs
    """An element as float32: bfloat16 (int16 bits) and float16 (uint16 bits) are widened,
    float32 kept (:func:`mean_array` gives those views)."""
    raise NotImplementedError


@overload(as_float32, inline="always", jit_options=JIT_OPTIONS)
def _as_float32(x):
    if x == types.int16:
        return lambda x: widen_bfloat16(x)
    if x == types.uint16:
        return lambda x: widen_float16(x)
    if x == types.float32:
        return lambda x: x
    return None


def divide_into(total, divisor, target):  # pragma: no cover - only its compiled overload runs
    """``target`` = ``total / divisor`` in ``target``'s type (int16: bfloat16 bits, uint16:
    float16 bits); whether a result is NaN/Inf."""
    raise NotImplementedError


@overload(divide_into, inline="always", jit_options=JIT_OPTIONS)
def _divide_into(total, divisor, target):
    if target.dtype == types.int16:
        return lambda total, divisor, target: divide_to_half(total, divisor, target, _BF16_EXPONENT)
    if target.dtype == types.uint16:
        return lambda total, divisor, target: divide_to_half(total, divisor, target, _F16_EXPONENT)
    if target.dtype == types.float32:
        return lambda total, divisor, target: divide_to_float32(total, divisor, target)
    return None


@njit(parallel=True, **JIT_OPTIONS)
def _mean(replicas, out, divisor, block_size):  # pragma: no cover - compiled
    """The mean of the replicas (addresses: :func:`replica_addresses`) into ``out`` (a
    :func:`mean_array` view, whose dtype the replicas are read as); whether it is finite.
    Each thread takes whole stripes (contiguous runs of blocks) with one float32 sum buffer;
    per block the first replica sets the sums (``0 + x``: -0 becomes +0, as added to zeros)
    and each later one is widened and added in the same pass, in replica order."""
    n = out.shape[0]
    blocks = (n + block_size - 1) // block_size
    stripes = min(blocks, STRIPES)
    bad = np.zeros(stripes, np.uint8)
    for stripe in prange(stripes):
        total = np.empty(block_size, np.float32)
        found = False
        for block in range(stripe * blocks // stripes, (stripe + 1) * blocks // stripes):
            lo = block * block_size
            hi = min(n, lo + block_size)
            sums = total[: hi - lo]
            first = array_at(replicas[0], n, out)[lo:hi]
            for i in range(hi - lo):
                sums[i] = np.float32(0.0) + as_float32(first[i])
            for k in range(1, replicas.shape[0]):
                replica = array_at(replicas[k], n, out)[lo:hi]
                for i in range(hi - lo):
                    sums[i] += as_float32(replica[i])
            found |= divide_into(sums, divisor, out[lo:hi])
        bad[stripe] = found
    return not bad.any()


def check_like(tensor: torch.Tensor, out: torch.Tensor, what: str) -> None:
    """Raise :class:`ValueError` unless ``tensor`` is a contiguous CPU tensor of ``out``'s dtype
    and size: the kernels read ``out.numel()`` elements of that dtype at its address."""
    if not (
        tensor.is_contiguous()
        and tensor.device.type == "cpu"
        and tensor.dtype == out.dtype
        and tensor.numel() == out.numel()
    ):
        raise ValueError(
            f"{what} is not a contiguous CPU tensor of {out.dtype} and {out.numel()} elements "
            f"like the output: {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        )


def replica_addresses(replicas: Sequence[torch.Tensor], out: torch.Tensor) -> np.ndarray:
    """The replicas' data addresses (uint64), as the kernels take them
    (:func:`.numba_bits.array_at`), after :func:`check_like`.

    Example:
        >>> replica_addresses([torch.ones(3)], torch.empty(2))
        Traceback (most recent call last):
        ...
        ValueError: replica 0 is not a contiguous CPU tensor of torch.float32 and 2 elements ...
    """
    for k, replica in enumerate(replicas):
        check_like(replica, out, f"replica {k}")
    return np.array([replica.data_ptr() for replica in replicas], dtype=np.uint64)


def use_torch_threads() -> None:
    """Give numba's parallel loops as many threads as torch's intra-op pool."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def draw_arguments(spec: DrawSpec, num_replicas: int) -> tuple:
    """``spec`` as :func:`draw_block` takes it: ``(keys, lane_bits, bits, thresholds, even)``,
    ``even`` when the thresholds are ``num_replicas`` equal shares."""
    shares = tuple(-(-s * UNIFORM_LEVELS // num_replicas) for s in range(1, num_replicas))
    return (
        np.asarray(spec.keys, dtype=np.int64),
        spec.lane_bits,
        spec.bits,
        np.asarray(spec.thresholds or (), dtype=np.int32),
        spec.thresholds == shares,
    )


def select_chunk(
    spec: DrawSpec,
    replica_bits: list[torch.Tensor],
    base_bits: torch.Tensor | None,
    out_bits: torch.Tensor,
    nonfinite_mask: int,
) -> bool:
    """Selection of contiguous 1-D integer bit views into ``out_bits``; ``False`` when an input
    element has all of ``nonfinite_mask``'s bits set (0: no check)."""
    use_torch_threads()
    dtype = out_bits.numpy().dtype
    if base_bits is not None:
        check_like(base_bits, out_bits, "the base")
    base = base_bits.numpy() if base_bits is not None else np.empty(0, dtype)
    k = len(replica_bits)
    keys, lane_bits, bits, thresholds, even = draw_arguments(spec, k)
    return bool(
        _select(
            replica_addresses(replica_bits, out_bits),
            base,
            out_bits.numpy(),
            keys,
            spec.start,
            spec.candidates,
            lane_bits,
            bits,
            thresholds,
            even,
            np.empty(0, np.uint32 if k <= 32 else np.uint64),  # 32-bit masks: 2x the SIMD lanes
            np.asarray([nonfinite_mask], dtype=dtype),
        )
    )


def mean_array(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` (contiguous) as the mean kernels take it, without a copy: float32 as it is,
    bfloat16 as its int16 bits and float16 as its uint16 bits (numba has neither type).

    Example:
        >>> mean_array(torch.tensor([1.0, -2.0], dtype=torch.float16))
        array([15360, 49152], dtype=uint16)
    """
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    if tensor.dtype == torch.float16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def mean_chunk(replicas: list[torch.Tensor], out: torch.Tensor) -> bool:
    """The plain mean of contiguous 1-D bfloat16, float16 or float32 tensors into ``out``;
    whether every output element is finite."""
    use_torch_threads()
    addresses = replica_addresses(replicas, out)
    many = len(replicas) * out.element_size() > 8
    block = MEAN_BLOCK_MANY if many else MEAN_BLOCK
    return bool(_mean(addresses, mean_array(out), np.float32(len(replicas)), block))
