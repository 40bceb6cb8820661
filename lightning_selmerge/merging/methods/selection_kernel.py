"""The fast kernel of parameter selection: keyed draws, resolution tables, bitwise select.

Nothing here does arithmetic on values: selection copies bit patterns, so every output element
is bit-identical to the element of the replica it was drawn from. What the kernel computes is
defined plainly by :meth:`ParameterSelection.reference
<lightning_selmerge.merging.methods.ParameterSelection.reference>`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..scratch import per_thread_buffer
from .base import ChunkContext, output_for, require_base

if TYPE_CHECKING:
    from .selection import ParameterSelection

__all__ = ["bit_view", "choose", "index_dtype", "merge_selection_chunk", "moved_bits"]

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def choose(
    method: ParameterSelection,
    ctx: ChunkContext,
    numel: int,
    num_replicas: int,
    moved: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The replica index chosen for each element of the chunk (see
    :meth:`ParameterSelection.choose`)."""
    if method.resample > 0:
        require_base(ctx.name, method, moved, "the base weights, to see what moved")
    if method.draw_lane_bits(num_replicas) is not None:
        return _choose_from_one_draw(method, ctx, numel, num_replicas, moved, device)
    uniforms = ctx.rng.uniform16(ctx.name, 0, ctx.start, numel, device)
    choice = method.draw(uniforms, num_replicas)
    if method.resample == 0:
        return choice
    moved = moved.to(choice.dtype)
    unmoved = ((moved >> choice) & 1) == 0
    pending = (unmoved & (moved != 0)).nonzero().squeeze(1)
    for redraw in range(1, method.resample + 1):
        if pending.numel() == 0:
            break
        candidate = method.draw(
            ctx.rng.uniform16_at(ctx.name, redraw, pending + ctx.start), num_replicas
        )
        choice[pending] = candidate
        pending = pending[((moved[pending] >> candidate) & 1) == 0]
    return choice


def _choose_from_one_draw(
    method: ParameterSelection,
    ctx: ChunkContext,
    numel: int,
    num_replicas: int,
    moved: torch.Tensor,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Dense resolution, last candidate first: keep candidate j where it moved."""
    resample = method.resample
    lane_bits = method.draw_lane_bits(num_replicas)
    table = _resolution_table(num_replicas, resample) if resample > 0 else None
    if table is not None:
        index = _table_index(ctx, numel, moved.to(torch.uint8), table, lane_bits, device)
        return table.on(index.device).index_select(0, index)
    lanes = _draw16(ctx, numel, 0xFFFF, lane_bits, device)
    bits, dtype = num_replicas.bit_length() - 1, index_dtype(num_replicas)

    def candidate(j: int) -> torch.Tensor:
        # bits [16 - (j+1)b, 16 - jb) of the draw; the arithmetic shift's sign copies are
        # masked away because they sit above the group.
        return ((lanes >> (16 - (j + 1) * bits)) & (num_replicas - 1)).to(dtype)

    choice = candidate(resample)
    if resample == 0:
        return choice
    moved = moved.to(dtype)
    for j in range(resample - 1, -1, -1):
        option = candidate(j)
        keep = ((moved >> option) & 1).neg_()
        choice ^= (choice ^ option) & keep
    return choice


def _choice_by_table(
    ctx: ChunkContext,
    bits: Sequence[torch.Tensor],
    base_bits: torch.Tensor,
    table: _ResolutionTable,
    lane_bits: int,
) -> torch.Tensor:
    """The dense one-draw resample's choice through :func:`_resolution_table`.

    Same choice as :func:`_choose_from_one_draw`, in a few flat passes over per-thread scratch
    buffers: :func:`moved_bits` added straight into the table index's cleared low bits (in the
    elements' own integer dtype, where the comparison is cheapest), then one table lookup on
    ``draw | moved`` resolves every element's candidates at once.
    """
    numel, device = base_bits.numel(), base_bits.device
    lanes = _draw16(ctx, numel, table.keep_mask, lane_bits, device)
    wide = torch.int64 if base_bits.dtype == torch.int64 else torch.int32
    index = per_thread_buffer("index", numel, wide, device)
    if table.shift == 0 and lanes.dtype == base_bits.dtype:
        moved_bits(bits, base_bits, out=lanes, accumulate=True)
        index.copy_(lanes.view(torch.uint16))
    else:
        index.copy_(lanes.view(torch.uint16))
        index <<= table.shift
        moved_bits(bits, base_bits, out=index, accumulate=True)
    choice = per_thread_buffer("choice", numel, torch.uint8, device)
    return torch.index_select(table.on(device), 0, index, out=choice)


def merge_selection_chunk(
    method: ParameterSelection,
    ctx: ChunkContext,
    replicas: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:meth:`ParameterSelection.merge_chunk`: the fastest of four paths for the parameters."""
    num_replicas, resample = len(replicas), method.resample
    bits = [bit_view(r) for r in replicas]
    numel, device, dtype = bits[0].numel(), bits[0].device, bits[0].dtype
    if resample > 0:
        require_base(ctx.name, method, base, "base=...")
    lane_bits = method.draw_lane_bits(num_replicas)
    one_draw = lane_bits is not None
    resolve = one_draw and resample > 0
    table = _resolution_table(num_replicas, resample) if resolve else None
    if one_draw and resample == 0:
        # The chosen index is the draw's top b bits: the masks are those bits, spread.
        lanes = _draw(ctx, numel, 0xFFFF, lane_bits, device)
        masks = _masks_from_draw(lanes, num_replicas, dtype)
    elif table is not None:
        choice = _choice_by_table(ctx, bits, bit_view(base), table, lane_bits)
        masks = _masks_from_choice(choice, num_replicas, dtype)
    else:
        moved = moved_bits(bits, bit_view(base)) if resample > 0 else None
        choice = choose(method, ctx, numel, num_replicas, moved, device)
        masks = _masks_from_choice(choice, num_replicas, dtype)
    out = output_for(replicas[0], out)
    _select_by_masks(bits, masks, bit_view(out))
    return out


#: Largest resolution table built, in entries (bytes); beyond it the dense path resolves directly.
_MAX_TABLE_ENTRIES = 1 << 20


@dataclass(frozen=True)
class _ResolutionTable:
    """``values[index]`` is the kept candidate for ``index = (u & keep_mask) << shift | moved``.

    ``u`` is the element's 16-bit draw, ``keep_mask`` keeps its top ``(resample + 1) * b`` bits
    (the candidates) and ``moved`` is the K-bit mask of :func:`moved_bits`. When the candidate
    bits leave room for ``moved`` below them, ``shift`` is 0 and the index is built in int16.
    """

    values: torch.Tensor
    keep_mask: int
    shift: int
    _copies: dict[torch.device, torch.Tensor] = field(
        default_factory=dict, compare=False, repr=False
    )

    def on(self, device: torch.device | str) -> torch.Tensor:
        """``values`` (uint8) on ``device``, copied there once."""
        device = torch.device(device)
        copy = self._copies.get(device)
        if copy is None:
            copy = self._copies[device] = self.values.to(device)
        return copy


_TABLES: dict[tuple[int, int], _ResolutionTable | None] = {}
_TABLES_LOCK = threading.Lock()


def _resolution_table(num_replicas: int, resample: int) -> _ResolutionTable | None:
    """The dense one-draw resolution as a lookup table, or ``None`` when it would be too big.

    Entry ``index`` holds the first candidate ``j = 0 .. resample`` whose replica moved, or the
    last candidate when none moved (its value is then the base's), exactly as the direct
    resolution in :func:`_choose_from_one_draw` picks it. Cached per
    ``(K, resample)``; at most 2**20 one-byte entries, so only K <= 8 replicas get one.
    """
    key = (num_replicas, resample)
    if key in _TABLES:
        return _TABLES[key]
    with _TABLES_LOCK:
        if key in _TABLES:
            return _TABLES[key]
        bits = num_replicas.bit_length() - 1
        used = (resample + 1) * bits
        shift = max(0, used + num_replicas - 16)
        table = None
        if num_replicas <= 8 and 1 << (16 + shift) <= _MAX_TABLE_ENTRIES:
            index = torch.arange(1 << (16 + shift), dtype=torch.int64)
            moved = index & ((1 << num_replicas) - 1)
            draw = index >> shift  # the draw's bits; those below the candidates are ignored
            choice = (draw >> (16 - used)) & (num_replicas - 1)  # the last candidate
            for j in range(resample - 1, -1, -1):
                option = (draw >> (16 - (j + 1) * bits)) & (num_replicas - 1)
                choice = torch.where((moved >> option) & 1 == 1, option, choice)
            keep_mask = ((1 << used) - 1) << (16 - used)
            table = _ResolutionTable(choice.to(torch.uint8), keep_mask, shift)
        _TABLES[key] = table
        return table


def _draw(
    ctx: ChunkContext, numel: int, keep: int, lane_bits: int, device: torch.device | str | None
) -> torch.Tensor:
    """The chunk's one-draw lanes of stream 0 (int8 or int16, ``lane_bits`` wide), ANDed with
    the top ``lane_bits`` bits of the 16-bit mask ``keep``; a view of a per-thread buffer."""
    words = per_thread_buffer(
        f"words{lane_bits}", ctx.rng.words_needed(numel, lane_bits), torch.int64, device
    )
    lane_keep = keep >> (16 - lane_bits)  # the mask's top lane_bits bits
    return ctx.rng.masked_lanes(
        ctx.name, 0, ctx.start, numel, lane_keep, device, lane_bits=lane_bits, buffer=words
    )


def _draw16(
    ctx: ChunkContext, numel: int, keep: int, lane_bits: int, device: torch.device | str | None
) -> torch.Tensor:
    """:func:`_draw` as int16 with the lane's bits at the top (an 8-bit lane shifted up by 8),
    so that candidate ``j`` is bits ``[16 - (j+1)b, 16 - jb)`` whatever the lane width."""
    lanes = _draw(ctx, numel, keep, lane_bits, device)
    if lane_bits == 16:
        return lanes
    draw = per_thread_buffer("draw16", numel, torch.int16, lanes.device).copy_(lanes)
    draw <<= 8  # int8 -> int16 sign-extended; the copies of the sign bit leave through the shift
    return draw


def _table_index(
    ctx: ChunkContext,
    numel: int,
    moved: torch.Tensor,
    table: _ResolutionTable,
    lane_bits: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int32 indices into ``table.values`` from the chunk's draws and its uint8 moved masks."""
    device = moved.device if device is None else torch.device(device)
    lanes = _draw16(ctx, numel, table.keep_mask, lane_bits, device)
    index = torch.empty(numel, dtype=torch.int32, device=device)
    # Same-dtype ORs: a uint8 operand would send int16/int32 ops down a type-promoting slow path.
    if table.shift == 0:
        moved16 = per_thread_buffer("moved16", numel, torch.int16, device).copy_(moved)
        lanes |= moved16  # the low bits the mask cleared take the moved mask
        return index.copy_(lanes.view(torch.uint16))
    index.copy_(lanes.view(torch.uint16))
    index <<= table.shift
    index |= per_thread_buffer("moved32", numel, torch.int32, device).copy_(moved)
    return index


def bit_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a same-width integer tensor (no copy)."""
    return tensor.view(_BITS_DTYPE[tensor.element_size()])


def moved_bits(
    replica_bits: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    base_bits: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Per element, bit ``k`` set where replica ``k``'s bits differ from the base's.

    ``replica_bits``: the replicas' bit views in order, or ``{k: bit view}`` for some of them (a
    rank's own replicas; the others' bits stay 0). The result is ``out`` when given, else a new
    tensor of ``dtype`` (default: the narrowest that holds a bit per replica). With
    ``accumulate=True`` the bits are added into ``out``, whose bits ``k`` must then be clear.

    When ``out`` has the bits' own dtype, each replica costs two same-dtype passes: ``torch.ne``
    into a 0/1 scratch of that dtype, then a shifted add. Otherwise each replica is XORed with
    the base and made boolean (on CPUs ``torch.ne`` into a bool is slower than both together).
    """
    items = list(
        replica_bits.items() if isinstance(replica_bits, Mapping) else enumerate(replica_bits)
    )
    numel, device, shape = base_bits.numel(), base_bits.device, base_bits.shape
    top = max((k for k, _ in items), default=0)
    if out is None:
        dtype = dtype if dtype is not None else index_dtype(top + 1)
        out = torch.empty(shape, dtype=dtype, device=device)
    if not accumulate:
        out.zero_()
    if out.dtype == base_bits.dtype and top < out.element_size() * 8 - 1:
        flag = per_thread_buffer("moved_flag", numel, out.dtype, device).view(shape)
        for k, replica in items:
            torch.ne(replica, base_bits, out=flag)  # 0 or 1 in the bits' dtype
            out.add_(flag, alpha=1 << k)
        return out
    delta = per_thread_buffer("delta", numel, base_bits.dtype, device).view(shape)
    flag = per_thread_buffer("flag", numel, torch.bool, device).view(shape)
    for k, replica in items:
        torch.bitwise_xor(replica, base_bits, out=delta)
        flag.copy_(delta)  # int -> bool is != 0
        out.add_(flag.view(torch.uint8), alpha=1 << k)
    return out


def index_dtype(num_replicas: int) -> torch.dtype:
    """The narrowest dtype holding a replica index and a bit per replica (shifts stay in it)."""
    for dtype, limit in ((torch.uint8, 8), (torch.int16, 15), (torch.int32, 31)):
        if num_replicas <= limit:
            return dtype
    return torch.int64


def _masks_from_draw(
    lanes: torch.Tensor, num_replicas: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Masks (0 or 1, in ``dtype``) for bit j (LSB first) of ``u >> (8 - b)``, ``K = 2**b``.

    ``lanes`` holds each element's 8-bit draw ``u`` (int8). Bit j of the choice is bit
    ``8 - b + j`` of ``u``: shifted up to the top bit and logically (as uint8) back down to bit
    0. Per-thread scratch buffers.
    """
    if lanes.dtype != torch.int8:
        raise ValueError(f"selection masks come from 8-bit draws, got {lanes.dtype} lanes")
    b = num_replicas.bit_length() - 1
    numel, device = lanes.numel(), lanes.device
    masks = []
    for j in range(b):
        position = 8 - b + j  # bit of the draw that is bit j of the choice
        mask = per_thread_buffer(f"draw_mask{j}", numel, torch.uint8, device)
        if position == 7:
            torch.bitwise_right_shift(lanes.view(torch.uint8), 7, out=mask)
        else:
            torch.bitwise_left_shift(lanes.view(torch.uint8), 7 - position, out=mask)
            mask >>= 7
        if dtype == torch.int8:
            mask = mask.view(torch.int8)
        else:
            mask = per_thread_buffer(f"mask{j}", numel, dtype, device).copy_(mask)
        masks.append(mask)
    return masks


def _masks_from_choice(
    choice: torch.Tensor, num_replicas: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Masks (0 or 1, in ``dtype``) for bit j (LSB first) of the chosen replica index."""
    levels = max(1, (num_replicas - 1).bit_length())
    numel, device = choice.numel(), choice.device
    bit = per_thread_buffer("choice_bit", numel, choice.dtype, device)
    masks = []
    for j in range(levels):
        if j == 0:
            torch.bitwise_and(choice, 1, out=bit)
        else:
            torch.bitwise_right_shift(choice, j, out=bit)
            if j < levels - 1:  # the top bit needs no mask: choice < 2**levels
                bit &= 1
        masks.append(per_thread_buffer(f"mask{j}", numel, dtype, device).copy_(bit))
    return masks


def _select_by_masks(
    bits: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    """Binary-tree select into ``out``: at level j, pair (a, b) becomes ``b`` where mask j is 1,
    else ``a`` (where it is 0). Levels below the last go to per-thread buffers.

    8- and 16-bit lanes take ``a + (b - a) * mask`` (two passes: ``sub``, then ``addcmul``),
    exact because the arithmetic is done in C++ ``int`` and wraps back to the lane's width;
    wider lanes, whose overflow C++ leaves undefined, take ``a ^ ((a ^ b) * mask)``.
    """
    numel, dtype, device = out.numel(), out.dtype, out.device
    wrapping = out.element_size() <= 2
    level, owned = list(bits), [False] * len(bits)
    for depth, mask in enumerate(masks):
        last = depth == len(masks) - 1
        merged, merged_owned = [], []
        for i in range(0, len(level), 2):
            if i + 1 == len(level):
                merged.append(level[i])
                merged_owned.append(owned[i])
                continue
            a, b = level[i], level[i + 1]
            # b's buffer (if ours) is free once read: a ^ b may overwrite it, never a's
            if last:
                target = out
            elif owned[i + 1]:
                target = b
            else:
                # one buffer per (level, pair): a buffer of this level may hold a result
                # that the next level still has to read
                target = per_thread_buffer(f"tree{depth}_{i // 2}", numel, dtype, device)
            if wrapping:
                torch.sub(b, a, out=target)
                torch.addcmul(a, target, mask, out=target)
            else:
                torch.bitwise_xor(a, b, out=target)
                target *= mask
                target ^= a
            merged.append(target)
            merged_owned.append(True)
        level, owned = merged, merged_owned
    if level[0] is not out:  # no masks: a single input
        out.copy_(level[0])
    return out
