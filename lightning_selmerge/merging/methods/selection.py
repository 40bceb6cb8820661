"""Parameter selection (Ju et al., 2024): each element copied from one replica drawn at random."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MergeError
from ..keyed_random import UNIFORM_LEVELS, KeyedRandom
from . import selection_kernel
from .base import ChunkContext, MergeMethod, check_weights
from .registry import register_method
from .selection_streaming import SelectionStreaming

__all__ = ["MAX_RESAMPLE", "ParameterSelection", "candidates_at"]

#: the most re-draws a selection merge takes: a candidate's position (and the streaming merge's
#: priority ``resample + 1 - position``) is a byte
MAX_RESAMPLE = 254


@register_method("selection")
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

    What it computes is :meth:`reference`; :meth:`merge_chunk` is the fast kernel
    (:mod:`~lightning_selmerge.merging.methods.selection_kernel`).

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> replicas = [{"w": torch.full((4,), float(k))} for k in range(3)]
        >>> merged = merge_state_dicts(replicas, method=ParameterSelection(), seed=0)["w"]
        >>> all(v in (0.0, 1.0, 2.0) for v in merged.tolist())
        True
    """

    probabilities: Sequence[float] | None = field(
        default=None,
        metadata={"help": "one probability per replica, summing to 1 (default: uniform 1/K)"},
    )
    resample: int = field(
        default=0,
        metadata={
            "help": "re-draw an element whose replica left it at the base, up to N times "
            f"(N <= {MAX_RESAMPLE})"
        },
    )
    _thresholds: dict[int, list[int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return self.resample > 0

    def streaming(self) -> SelectionStreaming:
        """Each replica copies the elements it wins (:mod:`.selection_streaming`)."""
        return SelectionStreaming(self)

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

    def check_parameters(self) -> None:
        resample = self.resample
        if not isinstance(resample, int) or isinstance(resample, bool) or resample < 0:
            raise MergeError(f"resample must be an integer >= 0, got {resample!r}")
        if resample > MAX_RESAMPLE:
            raise MergeError(
                f"resample={resample} is above {MAX_RESAMPLE}, the most a merge keeps (a "
                "candidate's position is a byte); with that many re-draws an element lands on "
                f"the base only when nearly no replica moved it: use resample <= {MAX_RESAMPLE}"
            )
        if self.probabilities is None:
            return
        check_weights(self.probabilities, None, "probabilities")
        if any(p < 0 or p > 1 for p in self.probabilities):
            raise MergeError(
                f"probabilities {list(self.probabilities)} out of range: each must be in [0, 1]"
            )
        if abs(sum(self.probabilities) - 1.0) > 1e-6:
            raise MergeError(
                f"probabilities {list(self.probabilities)} sum to {sum(self.probabilities)}: "
                "they must sum to 1"
            )

    def validate(self, num_replicas: int) -> None:
        super().validate(num_replicas)
        if num_replicas > 63:
            raise MergeError(f"selection merges at most 63 replicas, got {num_replicas}")
        check_weights(self.probabilities, num_replicas, "probabilities")

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
        dtype = selection_kernel.index_dtype(num_replicas)
        if self.probabilities is None:
            return ((uniforms * num_replicas) >> 16).to(dtype)
        choice = torch.zeros(uniforms.shape, dtype=dtype, device=uniforms.device)
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
        from the base; see :func:`~.selection_kernel.moved_bits`. Every rank of a distributed
        merge calls this with the same arguments and gets the same choice.
        """
        return selection_kernel.choose(self, ctx, numel, num_replicas, moved, device)

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
        if num_replicas & (num_replicas - 1):
            return None
        uniform = [k * (UNIFORM_LEVELS // num_replicas) for k in range(1, num_replicas)]
        if self.probabilities is not None and self.thresholds(num_replicas) != uniform:
            return None
        used = (self.resample + 1) * (num_replicas.bit_length() - 1)
        return 8 if used <= 8 else 16 if used <= 16 else None

    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return selection_kernel.merge_selection_chunk(self, ctx, replicas, base, out)

    def reference(
        self,
        name: str,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        rng: KeyedRandom,
    ) -> torch.Tensor:
        """Element ``i`` is the first of its candidates (:func:`candidates_at`) whose
        replica moved from the base (differs in any bit), else the base's value; with
        ``resample = 0`` it is candidate 0's value."""
        flat = [r.reshape(-1) for r in replicas]
        numel = flat[0].numel()
        candidates = candidates_at(self, rng, name, torch.arange(numel), len(flat))
        out = torch.empty_like(flat[0])
        for i in range(numel):
            if self.resample == 0:
                out[i] = flat[int(candidates[0, i])][i]
                continue
            base_value = base.reshape(-1)[i : i + 1]
            out[i] = base_value[0]
            for j in range(self.resample + 1):
                value = flat[int(candidates[j, i])][i : i + 1]
                if not torch.equal(value.view(torch.uint8), base_value.view(torch.uint8)):
                    out[i] = value[0]
                    break
        return out.view(replicas[0].shape)


def candidates_at(
    method: ParameterSelection,
    rng: KeyedRandom,
    name: str,
    offsets: torch.Tensor,
    num_replicas: int,
) -> torch.Tensor:
    """``[resample + 1, len(offsets)]``: candidate ``j`` (a replica index) of each element.

    The plain statement, for any element offsets (the reference merge uses it); the chunk
    kernel that a streaming merge runs is
    :func:`~.selection_candidates.selection_candidates`, which the tests hold to the same draws.

    With uniform probabilities and ``K = 2**b`` (see
    :meth:`ParameterSelection.draw_lane_bits`), candidate ``j`` is bits ``[w - (j+1)b, w - jb)``
    of the element's ``w``-bit lane of stream 0. Otherwise it is the replica whose probability
    interval holds the element's 16-bit uniform ``u`` of stream ``j``: the number of
    :meth:`ParameterSelection.thresholds` at or below ``u``.

    Example:
        >>> rng = KeyedRandom(seed=0)
        >>> candidates = candidates_at(ParameterSelection(resample=2), rng, "w",
        ...                                   torch.arange(5), num_replicas=4)
        >>> tuple(candidates.shape), bool(((candidates >= 0) & (candidates < 4)).all())
        ((3, 5), True)
    """
    rows = []
    lane_bits = method.draw_lane_bits(num_replicas)
    bits = num_replicas.bit_length() - 1
    for j in range(method.resample + 1):
        if lane_bits is not None:
            lane = rng.lanes_at(name, 0, offsets.clone(), lane_bits)
            rows.append((lane >> (lane_bits - (j + 1) * bits)) & (num_replicas - 1))
        else:
            u = rng.lanes_at(name, j, offsets.clone(), 16)
            thresholds = torch.tensor(method.thresholds(num_replicas), dtype=torch.int32)
            rows.append((u.unsqueeze(1) >= thresholds).sum(1))
    return torch.stack(rows).to(torch.int64)
