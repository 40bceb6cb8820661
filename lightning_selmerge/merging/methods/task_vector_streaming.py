"""Task arithmetic's and DARE's streaming form: a running task-vector combination, replica by
replica.

The state is one float32 (float64) value per element: the running weighted sum of the task
vectors (task arithmetic's ``sum``, DARE's ``mean``), or, for the ``selection`` combiners, the
task vector of the replica each element draws (drawn before any replica is read: the draws are
keyed by element, so they do not need the replicas). Each replica's chunk goes through the very
float ops of the method's ``merge_chunk`` (``r - base`` in the compute dtype, DARE's rescale and
drop, the weight, then ``+=`` in replica order), and :func:`~.task_vectors.with_base` adds the
base at the end: the result is the all-at-once merge's, bit for bit. TIES has no such form: its
elected sign needs every replica's trimmed task vector before any of them can be combined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import AverageNotFinite
from ..finite import all_finite, check_base_finite
from .base import StreamTensor, compute_dtype
from .task_vectors import CHOICE_STREAM, keyed_choice, with_base

if TYPE_CHECKING:
    from .dare import Dare
    from .task_arithmetic import TaskArithmetic

__all__ = ["TaskVectorStreaming"]


@dataclass(frozen=True)
class TaskVectorStreaming:
    """:class:`~.task_arithmetic.TaskArithmetic` or :class:`~.dare.Dare` with the replicas read
    one at a time.

    Example:
        >>> from lightning_selmerge.merging.methods import Dare, TaskArithmetic
        >>> TaskArithmetic().streaming().state_bytes(torch.bfloat16, 10)  # output + fp32 sum
        60
        >>> Dare(combine="selection").streaming().state_bytes(torch.bfloat16, 10)  # + choice
        70
    """

    method: TaskArithmetic | Dare

    def state_bytes(self, dtype: torch.dtype, numel: int) -> int:
        choice = 1 if self.method.combine == "selection" else 0
        return numel * (dtype.itemsize + (8 if dtype == torch.float64 else 4) + choice)

    def start(self, tensor: StreamTensor) -> _RunningTaskVector:
        return _RunningTaskVector(self.method, tensor)


class _RunningTaskVector:
    def __init__(self, method: TaskArithmetic | Dare, tensor: StreamTensor) -> None:
        self.method, self.tensor = method, tensor
        self.base = tensor.base.reshape(-1)  # the plan checked that the base is given
        check_base_finite(tensor.name, self.base)
        self.compute = compute_dtype(self.base)
        self.dare = hasattr(method, "drop_rate")
        self.select = method.combine == "selection"
        self.mixed = torch.zeros(tensor.numel, dtype=self.compute)
        if self.select:
            k = tensor.num_replicas
            self.choice = torch.empty(tensor.numel, dtype=torch.uint8 if k < 256 else torch.int32)
            for begin, end in tensor.chunks():
                drawn = keyed_choice(
                    tensor.context(begin), end - begin, method.weights, k, None, self.base.device
                )
                self.choice[begin:end] = drawn

    def add(self, position: int, flat: torch.Tensor) -> None:
        method, weights = self.method, self.method.weights
        for begin, end in self.tensor.chunks():
            piece = flat[begin:end]
            if not self.method.propagates_nonfinite:  # else the output is checked at the end
                self.tensor.check_finite(piece, position, begin)
            delta = piece.to(self.compute) - self.base[begin:end].to(self.compute)
            if self.dare:
                ctx = self.tensor.context(begin)
                u = ctx.rng.uniform16(
                    ctx.name, CHOICE_STREAM + 1 + position, begin, end - begin, delta.device
                )
                delta.mul_(torch.tensor(method.rescale, dtype=delta.dtype))
                delta.mul_(u >= method.drop_level)
            mixed = self.mixed[begin:end]
            if self.select:
                torch.where(self.choice[begin:end] == position, delta, mixed, out=mixed)
            elif self.dare:  # Dare.merge_chunk weighs by 1.0 when no weights are given
                weight = weights[position] if weights is not None else 1.0
                mixed += delta.mul_(torch.tensor(weight, dtype=delta.dtype))
            else:
                if weights is not None:
                    delta.mul_(torch.tensor(weights[position], dtype=delta.dtype))
                mixed += delta

    def finish(self) -> torch.Tensor:
        method, weights = self.method, self.method.weights
        total = sum(weights) if weights is not None else float(self.tensor.num_replicas)
        out = torch.empty(self.tensor.numel, dtype=self.tensor.dtype)
        for begin, end in self.tensor.chunks():
            mixed = self.mixed[begin:end]
            if self.select and not self.dare:  # task arithmetic: the sum's one-sample estimate
                mixed.mul_(torch.tensor(total, dtype=mixed.dtype))
            elif self.dare and not self.select:  # DARE's weighted mean
                mixed /= torch.tensor(total, dtype=mixed.dtype)
            base = self.base[begin:end]
            merged = out[begin:end].copy_(
                with_base(base.to(self.compute), mixed, method.scale, base)
            )
            if not all_finite(merged):  # NaN/Inf in a replica, or finite ones overflowed
                raise AverageNotFinite(self.tensor.name, begin, end, method)
        del self.mixed
        return out
