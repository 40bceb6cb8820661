"""Fused CPU kernels of the streaming merge (one replica at a time), compiled by numba.

The streaming forms of :mod:`..methods` (``SelectionStreaming``, ``AverageStreaming``) keep a
per-element state and fold each replica into it with a dozen torch passes per chunk. These
kernels fold a replica in one pass per block of :data:`~.numba_cpu.BLOCK` elements, with the
same bits: selection copies the bit patterns of the replica that wins an element (the earliest
candidate that moved from the base), the average adds the float32-widened replica into the
running float32 sum in feeding order, then divides and rounds as ``div_`` and ``copy_`` do.
Importing this module needs numba; :mod:`.streaming` imports it only when numba is installed.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .draws import DrawSpec
from .numba_bits import JIT_OPTIONS
from .numba_cpu import (
    BLOCK,
    HOST_UNCOVERED_MEAN_DTYPES,
    as_float32,
    divide_into,
    draw_arguments,
    draw_block,
    mean_array,
    use_torch_threads,
)

__all__ = [
    "HOST_UNCOVERED_MEAN_DTYPES",
    "add_to_sum",
    "divide_sum",
    "draw_candidates",
    "fold_selection",
]


@njit(parallel=True, **JIT_OPTIONS)
def _draw_candidates(
    out, keys, start, num_replicas, lane_bits, bits, thresholds, even
):  # pragma: no cover - compiled
    """``out[j, i]``: candidate ``j`` of element ``start + i``."""
    candidates, n = out.shape
    for block in prange((n + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        hi = min(n, lo + BLOCK)
        chosen = draw_block(
            keys, start + lo, hi - lo, candidates, num_replicas, lane_bits, bits, thresholds, even
        )
        for j in range(candidates):
            out[j, lo:hi] = chosen[j]


@njit(parallel=True, **JIT_OPTIONS)
def _fold_selection(candidates, position, piece, base, out, won, nonfinite):  # pragma: no cover
    """Replica ``position``'s ``piece`` (bit view) into ``out`` where it wins; whether ``piece``
    is free of NaN/Inf (``nonfinite``: the exponent mask, 0 for no check).

    ``won[i]``: ``count - j`` of the earliest candidate ``j`` of element ``i`` known to have
    moved (0: none yet); replica ``position`` wins where it is an earlier candidate and moved.
    Without resample (one candidate) it wins where it is the candidate."""
    count, n = candidates.shape
    mask = nonfinite[0]
    me = np.uint8(position)
    blocks = (n + BLOCK - 1) // BLOCK
    bad = np.zeros(blocks, np.uint8)
    for block in prange(blocks):
        lo = block * BLOCK
        hi = min(n, lo + BLOCK)
        m = hi - lo
        values = piece[lo:hi]
        target = out[lo:hi]
        if count == 1:
            mine = candidates[0, lo:hi]
            for i in range(m):
                value, kept = values[i], target[i]
                target[i] = value if mine[i] == me else kept
        else:
            # count - (earliest j with candidate j == position); 0 when it is no candidate
            score = np.zeros(m, np.uint8)
            for j in range(count - 1, -1, -1):
                row = candidates[j, lo:hi]
                weight = np.uint8(count - j)
                for i in range(m):
                    kept = score[i]
                    score[i] = weight if row[i] == me else kept
            origin = base[lo:hi]
            held = won[lo:hi]
            for i in range(m):  # loads outside the conditions, so that LLVM vectorises
                value, kept, mine, best = values[i], target[i], score[i], held[i]
                wins = (value != origin[i]) & (mine > best)
                target[i] = value if wins else kept
                held[i] = mine if wins else best
        found = False
        if mask != 0:
            for i in range(m):
                found |= (values[i] & mask) == mask
        bad[block] = found
    return not bad.any()


@njit(parallel=True, **JIT_OPTIONS)
def _add(total, piece, first):  # pragma: no cover - compiled
    """``total += float32(piece)`` (``piece``: a :func:`~.numba_cpu.mean_array` view); with
    ``first``, ``total = 0 + float32(piece)``, the bits of adding to zeros (-0 becomes +0)
    without zeroing ``total`` first."""
    n = total.shape[0]
    for block in prange((n + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        hi = min(n, lo + BLOCK)
        values, sums = piece[lo:hi], total[lo:hi]
        if first:
            for i in range(hi - lo):
                sums[i] = np.float32(0.0) + as_float32(values[i])
        else:
            for i in range(hi - lo):
                sums[i] += as_float32(values[i])


@njit(parallel=True, **JIT_OPTIONS)
def _divide(total, out, divisor):  # pragma: no cover - compiled
    """``out`` = ``total / divisor`` (``out``: a :func:`~.numba_cpu.mean_array` view); whether
    every result is finite."""
    n = total.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    bad = np.zeros(blocks, np.uint8)
    for block in prange(blocks):
        lo = block * BLOCK
        hi = min(n, lo + BLOCK)
        bad[block] = divide_into(total[lo:hi], divisor, out[lo:hi])
    return not bad.any()


def draw_candidates(spec: DrawSpec, numel: int, num_replicas: int) -> torch.Tensor:
    """The ``[spec.candidates, numel]`` candidate replicas (uint8) of elements ``spec.start
    ..``: :func:`~..candidates.selection_candidates`' values.

    Example:
        >>> from lightning_selmerge.merging import KeyedRandom
        >>> from lightning_selmerge.merging.methods.selection_candidates import selection_candidates
        >>> from lightning_selmerge.merging.methods import ChunkContext, ParameterSelection
        >>> method, ctx = ParameterSelection(resample=1), ChunkContext(KeyedRandom(0), "w", 0)
        >>> drawn = draw_candidates(DrawSpec.of(method, ctx, 4), 6, 4)
        >>> torch.equal(drawn, selection_candidates(method, ctx, 6, 4))
        True
    """
    use_torch_threads()
    out = torch.empty((spec.candidates, numel), dtype=torch.uint8)
    keys, lane_bits, bits, thresholds, even = draw_arguments(spec, num_replicas)
    _draw_candidates(out.numpy(), keys, spec.start, num_replicas, lane_bits, bits, thresholds, even)
    return out


def fold_selection(
    candidates: torch.Tensor,
    position: int,
    piece_bits: torch.Tensor,
    base_bits: torch.Tensor | None,
    out_bits: torch.Tensor,
    won: torch.Tensor | None,
    nonfinite_mask: int,
) -> bool:
    """Fold replica ``position`` (a contiguous 1-D bit view) into a selection's state; ``False``
    when one of its elements has all of ``nonfinite_mask``'s bits set (0: no check)."""
    use_torch_threads()
    dtype = out_bits.numpy().dtype
    empty_bits = np.empty(0, dtype)
    return bool(
        _fold_selection(
            candidates.numpy(),
            position,
            piece_bits.numpy(),
            empty_bits if base_bits is None else base_bits.numpy(),
            out_bits.numpy(),
            np.empty(0, np.uint8) if won is None else won.numpy(),
            np.asarray([nonfinite_mask], dtype=dtype),
        )
    )


def add_to_sum(total: torch.Tensor, piece: torch.Tensor, first: bool = False) -> None:
    """``total += piece`` in float32, ``piece`` a contiguous bfloat16, float16 or float32 tensor;
    with ``first``, ``total`` (uninitialised) becomes what adding ``piece`` to zeros gives.

    Example:
        >>> total = torch.empty(3)
        >>> add_to_sum(total, torch.tensor([-0.0, 1.5, 2.0]), first=True)
        >>> add_to_sum(total, torch.tensor([0.5, 0.25, 2.0], dtype=torch.bfloat16))
        >>> total.tolist(), torch.signbit(total[0]).item()
        ([0.5, 1.75, 4.0], False)
    """
    use_torch_threads()
    _add(total.numpy(), mean_array(piece), first)


def divide_sum(total: torch.Tensor, divisor: float, out: torch.Tensor) -> bool:
    """``out`` = ``total / divisor`` rounded to ``out``'s dtype (``total`` is left as it is);
    whether every element of ``out`` is finite."""
    use_torch_threads()
    return bool(_divide(total.numpy(), mean_array(out), np.float32(divisor)))
