"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint mean or disjoint selection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MergeError
from ..keyed_random import KeyedRandom
from . import magnitude_trim
from .base import ChunkContext, output_for, require_base
from .registry import register_method
from .task_vectors import (
    TaskVectorMethod,
    keyed_choice,
    pick,
    reference_choice,
    task_vectors,
    with_base,
)

__all__ = ["TiesMerging"]


@register_method("ties")
@dataclass(frozen=True)
class TiesMerging(TaskVectorMethod):
    """TIES: each replica's task vector ``x_k - base`` is trimmed to its ``density`` largest
    magnitudes over the whole tensor (:mod:`.magnitude_trim`), weighted (``w_k``), the sign of
    each element is elected by the sum of the weighted trimmed task vectors (``+`` at 0), and the
    replicas whose weighted trimmed task vector has that sign *agree*. Then:

    * ``combine="mean"``: the disjoint mean, ``sum(agreeing w_k d_k) / sum(agreeing w_k)`` (0
      where none agrees), as mergekit's ``ties``: bit for bit on float32 tensors, up to ties in
      magnitude at the trim's cut (mergekit's sort leaves their order open);
    * ``combine="selection"``: the disjoint *selection*, one agreeing replica's trimmed task
      vector drawn with probability proportional to its weight (keyed draws, see
      :mod:`.task_vectors`);

    times ``scale``, added to the base. Computed in float32 (float64 for float64 tensors). The
    trim needs the whole tensor: on sharded replicas it is refused.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> base = {"w": torch.zeros(4)}
        >>> replicas = [{"w": torch.tensor([1.0, -2.0, 0.1, 4.0])},
        ...             {"w": torch.tensor([3.0, 1.0, 0.2, -1.0])}]
        >>> merge_state_dicts(replicas, base=base, method=TiesMerging(density=0.5))["w"]
        tensor([ 3., -2.,  0.,  4.])
    """

    density: float = field(
        default=0.2, metadata={"help": "ties: fraction of each task vector's elements kept"}
    )
    needs_whole_tensor = True

    def check_parameters(self) -> None:
        super().check_parameters()
        if not 0 < self.density <= 1:
            raise MergeError(f"{self}: density must be in (0, 1], got {self.density}")

    def prepare_replica(
        self, name: str, replica: torch.Tensor, base: torch.Tensor | None, chunk_numel: int
    ) -> magnitude_trim.MagnitudeCut:
        """The replica's trim over its whole task vector."""
        require_base(name, self, base, "base=...")
        return magnitude_trim.magnitude_cut(replica, base, self.density, chunk_numel)

    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        require_base(ctx.name, self, base, "base=...")
        if ctx.prepared is None:
            raise MergeError(f"tensor {ctx.name!r}: {self} needs the trim of the whole tensor")
        wide_base, deltas = task_vectors(replicas, base)
        for delta, replica, cut in zip(deltas, replicas, ctx.prepared):
            mask = magnitude_trim.kept(cut, replica, base, ctx.start)
            if mask is not None:
                delta.mul_(mask)
        weighted = self._weighted(deltas)
        agree = _agreeing(weighted)
        if self.combine == "mean":
            mixed = torch.zeros_like(wide_base)
            divisor = torch.zeros_like(wide_base)
            weights = self.weights if self.weights is not None else [1.0] * len(deltas)
            for k, delta in enumerate(weighted):
                mixed += delta.mul_(agree[k])
                divisor += agree[k] * torch.tensor(weights[k], dtype=divisor.dtype)
            mixed /= divisor.masked_fill_(divisor == 0, 1)
        else:
            choice = keyed_choice(ctx, base.numel(), self.weights, len(deltas), agree, base.device)
            mixed = pick(deltas, choice)
        return output_for(replicas[0], out).copy_(with_base(wide_base, mixed, self.scale, base))

    def _weighted(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.weights is None:
            return [d.clone() for d in deltas] if self.combine == "selection" else deltas
        return [d * torch.tensor(w, dtype=d.dtype) for d, w in zip(deltas, self.weights)]

    def reference(
        self,
        name: str,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        rng: KeyedRandom,
    ) -> torch.Tensor:
        """Trim by :func:`~.magnitude_trim.reference_kept`; elect, agree and combine on whole
        tensors in replica order; the selection element by element."""
        wide_base, deltas = task_vectors(replicas, base)
        dtype = wide_base.dtype
        weights = self.weights if self.weights is not None else [1.0] * len(replicas)
        trimmed = [
            d * magnitude_trim.reference_kept(r, base, self.density)
            for d, r in zip(deltas, replicas)
        ]
        weighted = [d * torch.tensor(w, dtype=dtype) for d, w in zip(trimmed, weights)]
        elected = torch.zeros_like(wide_base)
        for d in weighted:
            elected = elected + d
        positive = elected >= 0
        agree = [torch.where(positive, d > 0, d < 0) for d in weighted]
        if self.combine == "mean":
            total = torch.zeros_like(wide_base)
            divisor = torch.zeros_like(wide_base)
            for d, w, a in zip(weighted, weights, agree):
                total = total + d * a
                divisor = divisor + a * torch.tensor(w, dtype=dtype)
            mixed = total / torch.where(divisor == 0, 1, divisor)
        else:
            flat = [d.reshape(-1) for d in trimmed]
            flat_agree = [a.reshape(-1) for a in agree]
            mixed = torch.zeros_like(flat[0])
            for i in range(mixed.numel()):
                eligible = [bool(a[i]) for a in flat_agree]
                c = reference_choice(rng, name, i, self.weights, eligible)
                mixed[i] = flat[c][i] if c >= 0 else 0.0
            mixed = mixed.view(wide_base.shape)
        return with_base(wide_base, mixed, self.scale, base)


def _agreeing(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[K, n]`` bool: replica k's weighted trimmed task vector has the elected sign (that of
    the sum, ``+`` at 0; a 0 agrees with neither)."""
    elected = torch.zeros_like(weighted[0])
    for d in weighted:
        elected += d
    positive = elected >= 0
    return torch.stack([torch.where(positive, d > 0, d < 0) for d in weighted])
