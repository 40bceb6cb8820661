"""DARE (Yu et al., 2024): drop task-vector elements at random, rescale the rest, combine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MergeError
from ..keyed_random import UNIFORM_LEVELS, KeyedRandom
from .base import ChunkContext, output_for, require_base
from .registry import register_method
from .task_vector_streaming import TaskVectorStreaming
from .task_vectors import (
    CHOICE_STREAM,
    TaskVectorMethod,
    keyed_choice,
    pick,
    reference_choice,
    task_vectors,
    with_base,
)

__all__ = ["Dare"]


@register_method("dare")
@dataclass(frozen=True)
class Dare(TaskVectorMethod):
    """DARE: each element of replica ``k``'s task vector is dropped with probability
    ``drop_rate`` and the kept ones are rescaled by ``1 / (1 - drop_rate)``; then

    * ``combine="mean"``: the weighted mean of the rescaled task vectors,
      ``sum_k w_k d_k / sum_k w_k``;
    * ``combine="selection"``: one replica's rescaled task vector drawn with probability
      ``w_k / sum(w)`` (0 where its element was dropped);

    times ``scale``, added to the base (float32; float64 for float64 tensors). ``drop_rate`` is
    resolved to a multiple of ``2**-16``; element ``i`` of replica ``k`` is dropped when its
    16-bit uniform of stream ``1 + k`` is below ``drop_rate * 2**16``, so the drops are keyed by
    (seed, tensor name, element offset) like every draw of the merge (mergekit's ``dare_linear``
    draws from the global RNG and rescales by the L1 norm instead).

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> base = {"w": torch.zeros(1000)}
        >>> replicas = [{"w": torch.ones(1000)}, {"w": torch.ones(1000)}]
        >>> merged = merge_state_dicts(replicas, base=base, method=Dare(drop_rate=0.5))["w"]
        >>> sorted(set(merged.tolist()))  # both dropped, one kept (x2, halved), both kept
        [0.0, 1.0, 2.0]
    """

    drop_rate: float = field(
        default=0.5, metadata={"help": "dare: chance of dropping each task-vector element"}
    )

    @property
    def drop_level(self) -> int:
        """``drop_rate`` in units of ``2**-16``: an element is dropped when ``u < drop_level``."""
        return round(self.drop_rate * UNIFORM_LEVELS)

    @property
    def rescale(self) -> float:
        """``1 / (1 - drop_rate)`` for the resolved drop rate."""
        return UNIFORM_LEVELS / (UNIFORM_LEVELS - self.drop_level)

    def check_parameters(self) -> None:
        super().check_parameters()
        if not (0 <= self.drop_rate < 1 and self.drop_level < UNIFORM_LEVELS):
            raise MergeError(f"{self}: drop_rate must be in [0, 1), got {self.drop_rate}")

    def streaming(self) -> TaskVectorStreaming:
        """A running task-vector combination, bit-identical to :meth:`merge_chunk`
        (:mod:`.task_vector_streaming`)."""
        return TaskVectorStreaming(self)

    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        require_base(ctx.name, self, base, "base=...")
        wide_base, deltas = task_vectors(replicas, base)
        numel, device = base.numel(), base.device
        rescale = torch.tensor(self.rescale, dtype=wide_base.dtype)
        for k, delta in enumerate(deltas):
            u = ctx.rng.uniform16(ctx.name, CHOICE_STREAM + 1 + k, ctx.start, numel, device)
            delta.mul_(rescale).mul_(u >= self.drop_level)
        if self.combine == "mean":
            weights = self.weights if self.weights is not None else [1.0] * len(deltas)
            mixed = torch.zeros_like(wide_base)
            for delta, weight in zip(deltas, weights):
                mixed += delta.mul_(torch.tensor(weight, dtype=delta.dtype))
            mixed /= torch.tensor(sum(weights), dtype=mixed.dtype)
        else:
            choice = keyed_choice(ctx, numel, self.weights, len(deltas), None, device)
            mixed = pick(deltas, choice)
        return output_for(replicas[0], out).copy_(with_base(wide_base, mixed, self.scale, base))

    def reference(
        self,
        name: str,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        rng: KeyedRandom,
    ) -> torch.Tensor:
        """Drops element by element from :meth:`KeyedRandom.uniform16_at`; the mean over
        replicas in order; the selection element by element."""
        wide_base, deltas = task_vectors(replicas, base)
        dtype = wide_base.dtype
        offsets = torch.arange(wide_base.numel())
        weights = self.weights if self.weights is not None else [1.0] * len(replicas)
        rescaled = []
        for k, delta in enumerate(deltas):
            u = rng.uniform16_at(name, CHOICE_STREAM + 1 + k, offsets.clone())
            keep = (u >= self.drop_level).view(delta.shape)
            rescaled.append(delta * torch.tensor(self.rescale, dtype=dtype) * keep)
        if self.combine == "mean":
            mixed = torch.zeros_like(wide_base)
            for d, w in zip(rescaled, weights):
                mixed = mixed + d * torch.tensor(w, dtype=dtype)
            mixed = mixed / torch.tensor(sum(weights), dtype=dtype)
        else:
            flat = [d.reshape(-1) for d in rescaled]
            mixed = torch.zeros_like(flat[0])
            for i in range(mixed.numel()):
                c = reference_choice(rng, name, i, self.weights, [True] * len(flat))
                mixed[i] = flat[c][i]
            mixed = mixed.view(wide_base.shape)
        return with_base(wide_base, mixed, self.scale, base)
