"""Task arithmetic (Ilharco et al., 2023): the base plus ``scale`` times the summed task vectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..keyed_random import KeyedRandom
from .base import ChunkContext, output_for, require_base
from .registry import register_method
from .task_vector_streaming import TaskVectorStreaming
from .task_vectors import (
    TaskVectorMethod,
    keyed_choice,
    pick,
    reference_choice,
    task_vectors,
    with_base,
)

__all__ = ["TaskArithmetic"]


@register_method("task_arithmetic")
@dataclass(frozen=True)
class TaskArithmetic(TaskVectorMethod):
    """``base + scale * sum_k w_k (x_k - base)``, in float32 (float64 for float64 tensors).

    ``combine="sum"`` is mergekit's ``task_arithmetic`` (``weight`` per model, ``lambda`` =
    ``scale``), bit for bit on float32 tensors. Weights may be negative there (subtracting a
    task vector). ``combine="selection"`` keeps one replica's task vector per element, drawn with
    probability ``w_k / sum(w)`` (weights >= 0), times ``sum(w)``: the sum's one-sample
    estimate, ``base + scale * sum(w) * (x_c - base)``. With ``scale = 1/K`` and equal weights
    the sum is the plain average and the selection is parameter selection (up to rounding).
    Needs the base.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> base = {"w": torch.zeros(2)}
        >>> replicas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
        >>> merge_state_dicts(replicas, base=base, method=TaskArithmetic(scale=0.5))["w"]
        tensor([0.5000, 1.0000])
    """

    weights: Sequence[float] | None = field(
        default=None,
        kw_only=True,
        metadata={
            "help": "one weight per replica, e.g. [1,-0.5] (default: all 1); negative ones "
            "with combine sum only (subtracting a task vector)"
        },
    )
    combine: str = field(
        default="sum", kw_only=True, metadata={"help": "sum|selection (default: sum)"}
    )
    combines = ("sum", "selection")

    @property
    def propagates_nonfinite(self) -> bool:  # type: ignore[override]
        return self.combine == "sum"  # every replica is added in

    @property
    def negative_weights_ok(self) -> bool:
        return self.combine == "sum"  # subtracting a task vector; nothing is drawn by weight

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
        weights = self.weights
        if self.combine == "sum":
            mixed = torch.zeros_like(wide_base)
            for k, delta in enumerate(deltas):
                if weights is not None:
                    delta.mul_(torch.tensor(weights[k], dtype=delta.dtype))
                mixed += delta
        else:
            choice = keyed_choice(ctx, base.numel(), weights, len(deltas), None, base.device)
            mixed = pick(deltas, choice)
            total = sum(weights) if weights is not None else float(len(deltas))
            mixed.mul_(torch.tensor(total, dtype=mixed.dtype))
        return output_for(replicas[0], out).copy_(with_base(wide_base, mixed, self.scale, base))

    def reference(
        self,
        name: str,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        rng: KeyedRandom,
    ) -> torch.Tensor:
        """The sum over replicas in replica order; or, per element, the drawn replica's task
        vector times ``sum(w)`` (:func:`~.task_vectors.reference_choice`)."""
        wide_base, deltas = task_vectors(replicas, base)
        dtype = wide_base.dtype
        weights = self.weights if self.weights is not None else [1.0] * len(replicas)
        if self.combine == "sum":
            mixed = torch.zeros_like(wide_base)
            for weight, delta in zip(weights, deltas):
                mixed = mixed + delta * torch.tensor(weight, dtype=dtype)
        else:
            flat = [d.reshape(-1) for d in deltas]
            mixed = torch.zeros_like(flat[0])
            for i in range(mixed.numel()):
                c = reference_choice(rng, name, i, self.weights, [True] * len(flat))
                mixed[i] = flat[c][i] * torch.tensor(sum(weights), dtype=dtype)
            mixed = mixed.view(wide_base.shape)
        return with_base(wide_base, mixed, self.scale, base)
