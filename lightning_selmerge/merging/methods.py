"""Merge methods over K aligned 1-D chunks of one tensor: weighted average and parameter selection.

A method sees flat, equally long chunks of the K replicas (and of the base, when it needs one),
plus a :class:`ChunkContext` naming the tensor and the chunk's flat offset, which keys the random
draws. Selection never does arithmetic on values: it copies bit patterns, so every output element
is bit-identical to the element of the replica it was drawn from.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import MergeError
from .keyed_random import UNIFORM_LEVELS, KeyedRandom
from .scratch import per_thread_buffer

__all__ = ["ChunkContext", "MergeMethod", "ParameterSelection", "WeightedAverage"]

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class ChunkContext:
    """Where a chunk sits: the tensor's name and the chunk's first flat element offset."""

    rng: KeyedRandom
    name: str
    start: int


class MergeMethod(ABC):
    """How K replicas' values of one tensor become one value."""

    #: Whether :meth:`merge_chunk` needs the base (pre-trained) tensor.
    needs_base: bool = False
    #: Whether a NaN or Inf in any replica always makes the merged chunk non-finite, so that a
    #: finite output proves finite inputs (the NaN/Inf check then reads the output only).
    propagates_nonfinite: bool = False

    @abstractmethod
    def validate(self, num_replicas: int) -> None:
        """Raise :class:`MergeError` when the method cannot merge ``num_replicas`` replicas."""

    @abstractmethod
    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merge flat, equally long chunks into ``out`` (a new tensor when ``None``) and return
        it, in the replicas' dtype. ``out`` must not overlap the inputs."""

    def subset(self, keep: Sequence[int]) -> MergeMethod:
        """This method for the replicas ``keep`` only (indices into the original K), used when
        replicas are dropped. Per-replica parameters follow their replicas; the default has none.
        """
        return self


def _check_num_replicas(num_replicas: int) -> None:
    if num_replicas < 2:
        raise MergeError(
            f"merging needs at least 2 replicas, got {num_replicas}: pass K >= 2 replica state "
            "dicts or checkpoints"
        )


def _check_length(values: Sequence[float], num_replicas: int, what: str) -> None:
    if len(values) != num_replicas:
        raise MergeError(
            f"{len(values)} {what} for {num_replicas} replicas: give exactly one per replica"
        )
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise MergeError(f"{what} must be finite numbers, got {list(values)}")


@dataclass(frozen=True)
class WeightedAverage(MergeMethod):
    """``sum_k w_k * x_k / sum_k w_k``, computed in float32 (float64 for float64 tensors).

    ``weights=None`` weighs every replica 1 (the plain mean). The arithmetic is that of
    mergekit's ``linear`` method (``addcmul_`` into a zeroed accumulator, then ``div_``), so the two
    give bit-identical outputs.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
        >>> merge_state_dicts([a, b], method=WeightedAverage(weights=[1.0, 3.0]))["w"]
        tensor([0.7500, 0.7500, 0.7500])
    """

    weights: Sequence[float] | None = None
    propagates_nonfinite = True  # every replica is added in: NaN/Inf reaches the output

    def subset(self, keep: Sequence[int]) -> WeightedAverage:
        """The kept replicas' weights (the average divides by their sum)."""
        if self.weights is None:
            return self
        return replace(self, weights=[self.weights[k] for k in keep])

    def validate(self, num_replicas: int) -> None:
        _check_num_replicas(num_replicas)
        if self.weights is None:
            return
        _check_length(self.weights, num_replicas, "weights")
        if not sum(self.weights) > 0:
            raise MergeError(
                f"average weights {list(self.weights)} sum to {sum(self.weights)}: "
                "they must sum to a positive number"
            )

    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        first = replicas[0]
        compute = torch.float64 if first.dtype == torch.float64 else torch.float32
        weights = torch.tensor(
            self.weights if self.weights is not None else [1.0] * len(replicas), dtype=compute
        )
        acc = (
            per_thread_buffer("accumulator", first.numel(), compute, first.device)
            .view(first.shape)
            .zero_()
        )
        # float8 takes no part in type promotion: those chunks are widened first (exactly)
        widen = first.element_size() == 1
        if self.weights is None:
            # x * 1.0 is exact, so add_ gives addcmul_'s bits at a fraction of its cost.
            for tensor in replicas:
                acc.add_(tensor.to(compute) if widen else tensor)
        else:
            for tensor, weight in zip(replicas, weights.to(first.device).unbind(0)):
                acc.addcmul_(tensor.to(compute) if widen else tensor, weight)
        acc.div_(weights.sum().to(first.device))
        out = _output_for(first, out)
        return out.copy_(acc)


@dataclass(frozen=True)
class ParameterSelection(MergeMethod):
    """Each element copied from one replica drawn at random (Ju et al., 2024).

    Args:
        probabilities: chance of each replica; ``None`` is uniform ``1/K``. Probabilities are
            resolved to multiples of ``2**-16``.
        resample: when the drawn replica left the element at the base (pre-trained) value, draw
            again, up to this many times (the paper's *resample*). Needs the base weights. The
            ``resample + 1`` candidates are drawn up front and the first that moved is kept, so
            this is one pass whatever ``resample`` is.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> replicas = [{"w": torch.full((4,), float(k))} for k in range(3)]
        >>> merged = merge_state_dicts(replicas, method=ParameterSelection(), seed=0)["w"]
        >>> all(v in (0.0, 1.0, 2.0) for v in merged.tolist())
        True
    """

    probabilities: Sequence[float] | None = None
    resample: int = 0
    _thresholds: dict[int, list[int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return self.resample > 0

    def subset(self, keep: Sequence[int]) -> ParameterSelection:
        """The kept replicas' probabilities, renormalised to sum to 1."""
        if self.probabilities is None:
            return self
        kept = [float(self.probabilities[k]) for k in keep]
        total = sum(kept)
        if not total > 0:
            raise MergeError(
                f"the replicas left {list(keep)} all have selection probability 0 "
                f"(probabilities {list(self.probabilities)}): nothing to select from"
            )
        return ParameterSelection(probabilities=[p / total for p in kept], resample=self.resample)

    def validate(self, num_replicas: int) -> None:
        _check_num_replicas(num_replicas)
        if num_replicas > 63:
            raise MergeError(f"selection merges at most 63 replicas, got {num_replicas}")
        if not isinstance(self.resample, int) or self.resample < 0:
            raise MergeError(f"resample must be an integer >= 0, got {self.resample!r}")
        if self.probabilities is None:
            return
        _check_length(self.probabilities, num_replicas, "probabilities")
        if any(p < 0 or p > 1 for p in self.probabilities):
            raise MergeError(
                f"probabilities {list(self.probabilities)} out of range: each must be in [0, 1]"
            )
        if abs(sum(self.probabilities) - 1.0) > 1e-6:
            raise MergeError(
                f"probabilities {list(self.probabilities)} sum to {sum(self.probabilities)}: "
                "they must sum to 1"
            )

    def thresholds(self, num_replicas: int) -> list[int]:
        """Replica ``k`` is drawn when ``thresholds[k-1] <= u < thresholds[k]`` (``u`` 16-bit)."""
        cached = self._thresholds.get(num_replicas)
        if cached is None:
            if self.probabilities is None:
                cumulative = [k / num_replicas for k in range(1, num_replicas)]
            else:
                cumulative = [sum(self.probabilities[: k + 1]) for k in range(num_replicas - 1)]
            cached = [math.ceil(c * UNIFORM_LEVELS - 1e-9) for c in cumulative]
            self._thresholds[num_replicas] = cached
        return cached

    def draw(self, uniforms: torch.Tensor, num_replicas: int) -> torch.Tensor:
        """Map 16-bit uniforms (int32) to replica indices (uint8 or int16)."""
        if self.probabilities is None:
            return ((uniforms * num_replicas) >> 16).to(_index_dtype(num_replicas))
        choice = torch.zeros(
            uniforms.shape, dtype=_index_dtype(num_replicas), device=uniforms.device
        )
        for threshold in self.thresholds(num_replicas):
            choice += uniforms >= threshold
        return choice

    def choose(
        self,
        ctx: ChunkContext,
        numel: int,
        num_replicas: int,
        moved: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The replica index chosen for each element of the chunk.

        ``moved`` (needed when ``resample > 0``) has bit ``k`` set where replica ``k`` differs
        from the base; see :func:`moved_bits`. Every rank of a distributed merge calls this with
        the same arguments and gets the same choice.
        """
        if self.resample > 0 and moved is None:
            raise MergeError(f"{ctx.name}: resample needs the base weights to see what moved")
        if self.candidates_share_one_draw(num_replicas):
            return self._choose_from_one_draw(ctx, numel, num_replicas, moved, device)
        uniforms = ctx.rng.uniform16(ctx.name, 0, ctx.start, numel, device)
        choice = self.draw(uniforms, num_replicas)
        if self.resample == 0:
            return choice
        moved = moved.to(choice.dtype)
        unmoved = ((moved >> choice) & 1) == 0
        pending = (unmoved & (moved != 0)).nonzero().squeeze(1)
        for redraw in range(1, self.resample + 1):
            if pending.numel() == 0:
                break
            candidate = self.draw(
                ctx.rng.uniform16_at(ctx.name, redraw, pending + ctx.start), num_replicas
            )
            choice[pending] = candidate
            pending = pending[((moved[pending] >> candidate) & 1) == 0]
        return choice

    def candidates_share_one_draw(self, num_replicas: int) -> bool:
        """Whether all ``resample + 1`` candidates come from the element's one draw.

        With uniform probabilities and ``K = 2**b`` replicas, candidate ``j`` is the ``j``-th
        ``b``-bit group, from the top, of the element's lane of stream 0: its 8-bit lane when
        ``(resample + 1) * b <= 8`` (so plain selection hashes one word per 8 elements), else
        its 16-bit lane when ``(resample + 1) * b <= 16``. Otherwise candidate ``j`` is drawn
        from stream ``j``'s 16-bit uniforms. All give each candidate uniformly and
        independently; where the lane widths agree, candidate 0 is the plain selection's choice.
        """
        return self.draw_lane_bits(num_replicas) is not None

    def draw_lane_bits(self, num_replicas: int) -> int | None:
        """Width (8 or 16) of the lane all candidates share, or ``None`` when they do not.

        Probabilities that resolve to exactly ``1/K`` count as uniform: they draw the same bits.
        """
        if not _is_power_of_two(num_replicas):
            return None
        uniform = [k * (UNIFORM_LEVELS // num_replicas) for k in range(1, num_replicas)]
        if self.probabilities is not None and self.thresholds(num_replicas) != uniform:
            return None
        used = (self.resample + 1) * (num_replicas.bit_length() - 1)
        return 8 if used <= 8 else 16 if used <= 16 else None

    def _choose_from_one_draw(
        self,
        ctx: ChunkContext,
        numel: int,
        num_replicas: int,
        moved: torch.Tensor,
        device: torch.device | str | None,
    ) -> torch.Tensor:
        """Dense resolution, last candidate first: keep candidate j where it moved."""
        lane_bits = self.draw_lane_bits(num_replicas)
        table = _resolution_table(num_replicas, self.resample) if self.resample > 0 else None
        if table is not None:
            index = _table_index(ctx, numel, moved.to(torch.uint8), table, lane_bits, device)
            return table.on(index.device).index_select(0, index)
        lanes = _draw16(ctx, numel, 0xFFFF, lane_bits, device)
        bits, dtype = num_replicas.bit_length() - 1, _index_dtype(num_replicas)

        def candidate(j: int) -> torch.Tensor:
            # bits [16 - (j+1)b, 16 - jb) of the draw; the arithmetic shift's sign copies are
            # masked away because they sit above the group.
            return ((lanes >> (16 - (j + 1) * bits)) & (num_replicas - 1)).to(dtype)

        choice = candidate(self.resample)
        if self.resample == 0:
            return choice
        moved = moved.to(dtype)
        for j in range(self.resample - 1, -1, -1):
            option = candidate(j)
            keep = ((moved >> option) & 1).neg_()
            choice ^= (choice ^ option) & keep
        return choice

    def _choice_by_table(
        self,
        ctx: ChunkContext,
        bits: Sequence[torch.Tensor],
        base_bits: torch.Tensor,
        table: _ResolutionTable,
        lane_bits: int,
    ) -> torch.Tensor:
        """The dense one-draw resample's choice through :func:`_resolution_table`.

        Same choice as :meth:`_choose_from_one_draw`, in a few flat passes over per-thread
        scratch buffers: :func:`moved_bits` added straight into the table index's cleared low
        bits (in the elements' own integer dtype, where the comparison is cheapest), then one
        table lookup on ``draw | moved`` resolves every element's candidates at once.
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

    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_replicas = len(replicas)
        bits = [bit_view(r) for r in replicas]
        numel, device, dtype = bits[0].numel(), bits[0].device, bits[0].dtype
        if self.resample > 0 and base is None:
            raise MergeError(
                f"{ctx.name}: selection with resample={self.resample} needs the base "
                "(pre-trained) weights: pass base=..."
            )
        lane_bits = self.draw_lane_bits(num_replicas)
        one_draw = lane_bits is not None
        resolve = one_draw and self.resample > 0
        table = _resolution_table(num_replicas, self.resample) if resolve else None
        if one_draw and self.resample == 0:
            # The chosen index is the draw's top b bits: the masks are those bits, spread.
            lanes = _draw(ctx, numel, 0xFFFF, lane_bits, device)
            masks = _masks_from_draw(lanes, num_replicas, dtype)
        elif table is not None:
            choice = self._choice_by_table(ctx, bits, bit_view(base), table, lane_bits)
            masks = _masks_from_choice(choice, num_replicas, dtype)
        else:
            moved = moved_bits(bits, bit_view(base)) if self.resample > 0 else None
            choice = self.choose(ctx, numel, num_replicas, moved, device)
            masks = _masks_from_choice(choice, num_replicas, dtype)
        out = _output_for(replicas[0], out)
        _select_by_masks(bits, masks, bit_view(out))
        return out


def _output_for(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked against ``like`` (same numel and dtype), or a new tensor like it."""
    if out is None:
        return torch.empty_like(like)
    if out.numel() != like.numel() or out.dtype != like.dtype:
        raise MergeError(
            f"out holds {out.numel()} {out.dtype} elements, the chunk {like.numel()} {like.dtype}"
        )
    return out.view(like.shape)


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
    resolution in :meth:`ParameterSelection._choose_from_one_draw` picks it. Cached per
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
        dtype = dtype if dtype is not None else _index_dtype(top + 1)
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


def _index_dtype(num_replicas: int) -> torch.dtype:
    """The narrowest dtype holding a replica index and a bit per replica (shifts stay in it)."""
    for dtype, limit in ((torch.uint8, 8), (torch.int16, 15), (torch.int32, 31)):
        if num_replicas <= limit:
            return dtype
    return torch.int64


def _is_power_of_two(value: int) -> bool:
    return value & (value - 1) == 0


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
