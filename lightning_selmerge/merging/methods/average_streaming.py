"""The weighted average's streaming form: a running float32 (float64) sum, replica by replica.

Each replica is added chunk by chunk with the very float ops of ``WeightedAverage.merge_chunk``
(``add_`` unweighted, ``addcmul_`` weighted, then ``div_``), so the same sum in the same order:
the result is bit-identical to the all-at-once merge. Replicas are added blindly; the output is
checked at the end (:class:`~..errors.AverageNotFinite`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import AverageNotFinite
from ..finite import all_finite
from .base import StreamTensor, compute_dtype

if TYPE_CHECKING:
    from .average import WeightedAverage

__all__ = ["AverageStreaming", "RunningSum"]


@dataclass(frozen=True)
class AverageStreaming:
    """:class:`~.average.WeightedAverage` with the replicas read one at a time.

    Example:
        >>> from lightning_selmerge.merging.methods import WeightedAverage
        >>> WeightedAverage().streaming().state_bytes(torch.bfloat16, 10)  # output + fp32 sum
        60
    """

    method: WeightedAverage

    def state_bytes(self, dtype: torch.dtype, numel: int) -> int:
        return numel * (dtype.itemsize + (8 if dtype == torch.float64 else 4))

    def start(self, tensor: StreamTensor) -> RunningSum:
        return RunningSum(self.method, tensor)


class RunningSum:
    """A float32 (float64) running sum of the replicas fed so far; :meth:`finish` divides it."""

    def __init__(self, method: WeightedAverage, tensor: StreamTensor) -> None:
        self.method, self.tensor = method, tensor
        self.compute = compute_dtype(torch.empty(0, dtype=tensor.dtype))
        weights = method.weights if method.weights is not None else [1.0] * tensor.num_replicas
        stacked = torch.tensor(weights, dtype=self.compute)
        self.weights, self.total = stacked.unbind(0), stacked.sum()
        self.sum = self.new_sum()
        self.widen = tensor.dtype.itemsize == 1  # float8 takes no part in type promotion

    def new_sum(self) -> torch.Tensor:
        """The sum before any replica is fed: zeros."""
        return torch.zeros(self.tensor.numel, dtype=self.compute)

    def add(self, position: int, flat: torch.Tensor) -> None:
        for begin, end in self.tensor.chunks():
            piece = flat[begin:end].to(self.compute) if self.widen else flat[begin:end]
            if self.method.weights is None:
                self.sum[begin:end].add_(piece)
            else:
                self.sum[begin:end].addcmul_(piece, self.weights[position])

    def finish(self) -> torch.Tensor:
        out = torch.empty(self.tensor.numel, dtype=self.tensor.dtype)
        for begin, end in self.tensor.chunks():
            merged = out[begin:end].copy_(self.sum[begin:end].div_(self.total))
            self.check_output(merged, begin, end)
        del self.sum
        return out

    def check_output(self, merged: torch.Tensor, begin: int, end: int) -> None:
        """:class:`AverageNotFinite` when ``merged`` (output elements ``begin .. end``) is not
        finite."""
        if not all_finite(merged):
            raise AverageNotFinite(self.tensor.name, begin, end, self.method)
