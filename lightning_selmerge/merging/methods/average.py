"""Weighted average: ``sum_k w_k * x_k / sum_k w_k``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import MergeError
from ..keyed_random import KeyedRandom
from ..scratch import per_thread_buffer
from .average_streaming import AverageStreaming
from .base import ChunkContext, MergeMethod, check_weights, compute_dtype, output_for
from .registry import register_method

__all__ = ["WeightedAverage"]


@register_method("average")
@dataclass(frozen=True)
class WeightedAverage(MergeMethod):
    """``sum_k w_k * x_k / sum_k w_k``, computed in float32 (float64 for float64 tensors).

    ``weights=None`` weighs every replica 1 (the plain mean). Weights must be non-negative with
    a positive sum (an average with a negative weight extrapolates: for that, subtract a task
    vector with :class:`~lightning_selmerge.merging.methods.TaskArithmetic`, whose weights may
    be negative). The arithmetic is that of mergekit's ``linear`` method (``addcmul_`` into a
    zeroed accumulator, then ``div_``), so the two give bit-identical outputs.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
        >>> merge_state_dicts([a, b], method=WeightedAverage(weights=[1.0, 3.0]))["w"]
        tensor([0.7500, 0.7500, 0.7500])
    """

    weights: Sequence[float] | None = field(
        default=None,
        metadata={"help": "one non-negative weight per replica, e.g. [1,1,2] (default: all 1)"},
    )
    propagates_nonfinite = True  # every replica is added in: NaN/Inf reaches the output
    exact_reference = False  # addcmul_ may fuse the multiply-add the reference rounds twice

    def streaming(self) -> AverageStreaming:
        """A running sum, bit-identical to :meth:`merge_chunk` (:mod:`.average_streaming`)."""
        return AverageStreaming(self)

    def subset(self, keep: Sequence[int]) -> WeightedAverage:
        """The kept replicas' weights (the average divides by their sum)."""
        if self.weights is None:
            return self
        return replace(self, weights=[self.weights[k] for k in keep])

    def check_parameters(self) -> None:
        if self.weights is None:
            return
        check_weights(self.weights, None, "weights")
        if not sum(self.weights) > 0:
            raise MergeError(
                f"average weights {list(self.weights)} sum to {sum(self.weights)}: "
                "they must sum to a positive number"
            )
        if any(w < 0 for w in self.weights):
            raise MergeError(
                f"average weights {list(self.weights)} include a negative weight: an average "
                "takes weights >= 0 (to subtract a replica's task vector use method "
                "'task_arithmetic', whose weights may be negative)"
            )

    def validate(self, num_replicas: int) -> None:
        super().validate(num_replicas)
        check_weights(self.weights, num_replicas, "weights")

    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        first = replicas[0]
        compute = compute_dtype(first)
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
        out = output_for(first, out)
        return out.copy_(acc)

    def reference(
        self,
        name: str,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        rng: KeyedRandom,
    ) -> torch.Tensor:
        """``sum_k w_k * x_k / sum_k w_k`` in the compute dtype, rounded once to the replicas'."""
        compute = compute_dtype(replicas[0])
        weights = self.weights if self.weights is not None else [1.0] * len(replicas)
        total = torch.zeros(replicas[0].shape, dtype=compute)
        for weight, replica in zip(weights, replicas):
            total = total + torch.tensor(weight, dtype=compute) * replica.to(compute)
        return (total / torch.tensor(sum(weights), dtype=compute)).to(replicas[0].dtype)
