"""What a fused selection kernel needs to know to draw an element's candidates.

A :class:`DrawSpec` is :func:`~lightning_selmerge.merging.methods.selection.candidates_at`
written as numbers a kernel can use, with nothing left to Python: the hash keys, the lane width,
and either the bit groups of one shared draw or the thresholds of one draw per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import ChunkContext
from ..methods.selection import ParameterSelection

__all__ = ["NONFINITE_MASKS", "DrawSpec"]

#: An element is NaN or +-Inf when all of these (its exponent) bits are set. float8 types have
#: none: e4m3fn's all-ones exponent is mostly finite numbers, so their chunks take the torch path.
NONFINITE_MASKS: dict[torch.dtype, int] = {
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
}


@dataclass(frozen=True)
class DrawSpec:
    """The draws of one chunk: ``candidates`` replica indices per element, first that moved wins.

    Shared-lane mode (``thresholds is None``): one hash stream (``keys[0]``), ``lane_bits``-bit
    lanes (8 or 16); candidate ``j`` is bits ``[lane_bits - (j+1)*bits, lane_bits - j*bits)``
    of the element's lane. Threshold mode: stream ``j`` (key ``keys[j]``) gives the element a
    16-bit uniform ``u`` and candidate ``j`` counts the ``thresholds`` at or below ``u``.

    Element ``i`` of the chunk is element ``start + i`` of the whole tensor; its lane lives in
    hash word ``(start + i) // (64 // lane_bits)``, word ``w`` hashing to
    ``splitmix64(w * 0x9E3779B97F4A7C15 + key)`` (see :mod:`..keyed_random`).

    Example:
        >>> from lightning_selmerge.merging import KeyedRandom
        >>> ctx = ChunkContext(KeyedRandom(0), "w", start=8)
        >>> spec = DrawSpec.of(ParameterSelection(resample=1), ctx, num_replicas=4)
        >>> spec.lane_bits, spec.bits, spec.candidates, spec.thresholds
        (8, 2, 2, None)
        >>> DrawSpec.of(ParameterSelection(), ctx, num_replicas=3).thresholds
        (21846, 43691)
    """

    keys: tuple[int, ...]
    start: int
    candidates: int
    lane_bits: int
    bits: int
    thresholds: tuple[int, ...] | None

    @classmethod
    def of(cls, method: ParameterSelection, ctx: ChunkContext, num_replicas: int) -> DrawSpec:
        """The draws ``method`` makes for the chunk at ``ctx`` among ``num_replicas``."""
        candidates = method.resample + 1
        lane_bits = method.draw_lane_bits(num_replicas)
        if lane_bits is not None:
            key = ctx.rng.key(ctx.name, 0)
            bits = num_replicas.bit_length() - 1
            return cls((key,), ctx.start, candidates, lane_bits, bits, None)
        keys = tuple(ctx.rng.key(ctx.name, j) for j in range(candidates))
        thresholds = tuple(method.thresholds(num_replicas))
        return cls(keys, ctx.start, candidates, 16, 0, thresholds)
