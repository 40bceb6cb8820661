"""Each element's candidate replicas in parameter selection, before any replica is read.

:class:`~.selection.ParameterSelection` with ``resample = n`` keeps, per element,
the first of ``n + 1`` candidate replicas ``c_0 .. c_n`` whose value moved from the base (the
base's value when none did; plain selection keeps ``c_0``). The candidates depend only on the
seed, the tensor's name and the element's offset, never on the replicas' values, so a streaming
merge can compute them up front and let replica ``k`` fill exactly the elements it wins.

This is the plain statement of the draws that ``ParameterSelection.merge_chunk`` makes in its
fused kernels (``tests/reference_merge.py:candidate`` states it element by element):

* uniform probabilities and ``K = 2**b`` replicas with ``(n + 1) * b <= 16``: all candidates come
  from the element's one lane of stream 0 (8 bits wide when ``(n + 1) * b <= 8``, else 16);
  candidate ``j`` is the ``j``-th ``b``-bit group from the lane's top;
* otherwise candidate ``j`` maps stream ``j``'s 16-bit uniform ``u`` through the cumulative
  thresholds (``(u * K) >> 16`` for uniform probabilities).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import ChunkContext

if TYPE_CHECKING:
    from .selection import ParameterSelection

__all__ = ["selection_candidates"]


def selection_candidates(
    method: ParameterSelection,
    ctx: ChunkContext,
    numel: int,
    num_replicas: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[method.resample + 1, numel]`` candidate replica indices (uint8) of a chunk.

    Row ``j`` holds candidate ``j`` of elements ``ctx.start .. ctx.start + numel`` of tensor
    ``ctx.name``; the draws are those of ``method.merge_chunk`` with the same context and ``K``.

    Example:
        >>> from lightning_selmerge.merging import KeyedRandom, ParameterSelection
        >>> ctx = ChunkContext(KeyedRandom(0), "w", start=0)
        >>> whole = selection_candidates(ParameterSelection(resample=2), ctx, 10, 3)
        >>> whole.shape
        torch.Size([3, 10])
        >>> part = selection_candidates(ParameterSelection(resample=2),
        ...                             ChunkContext(KeyedRandom(0), "w", start=4), 3, 3)
        >>> bool((whole[:, 4:7] == part).all())
        True
    """
    method.validate(num_replicas)
    count = method.resample + 1
    out = torch.empty((count, numel), dtype=torch.uint8, device=device)
    lane_bits = method.draw_lane_bits(num_replicas)
    if lane_bits is not None:
        lanes = ctx.rng.masked_lanes(
            ctx.name, 0, ctx.start, numel, 0xFFFF, device, lane_bits=lane_bits
        )
        # 8-bit lanes shift as uint8 (cheap); 16-bit lanes as int32 (no uint16 shifts on CPU)
        unsigned = lanes.view(torch.uint8) if lane_bits == 8 else lanes.to(torch.int32) & 0xFFFF
        bits = num_replicas.bit_length() - 1
        for j in range(count):
            group = torch.bitwise_right_shift(unsigned, lane_bits - (j + 1) * bits)
            out[j] = group.bitwise_and_(num_replicas - 1)
        return out
    for j in range(count):
        uniforms = ctx.rng.uniform16(ctx.name, j, ctx.start, numel, device)
        out[j] = method.draw(uniforms, num_replicas)
    return out
