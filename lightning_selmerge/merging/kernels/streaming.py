"""The streaming merge's states on fused kernels: the same state, each replica folded in one pass.

:func:`fused_streaming_state` gives the accumulator of a tensor that a fused kernel covers (the
drivers call it before the method's own :class:`~..methods.StreamingForm`): a subclass of the
torch state (:class:`~..methods.selection_streaming.CandidateState`,
:class:`~..methods.average_streaming.RunningSum`) whose candidate draws, per-replica fold and
final division run in :mod:`.numba_streaming`. The bits are the torch state's; so are the
errors: when a kernel reports NaN/Inf, the torch state's own check runs over the same chunks to
raise what it raises.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..methods.average import WeightedAverage
from ..methods.average_streaming import RunningSum
from ..methods.base import MergeMethod, ReplicaAccumulator, StreamTensor
from ..methods.selection import ParameterSelection
from ..methods.selection_kernel import bit_view
from ..methods.selection_streaming import CandidateState
from .dispatch import fused_backend
from .draws import NONFINITE_MASKS, DrawSpec

__all__ = ["fused_streaming_state"]

_STREAMING_MODULE = "numba_streaming"


def fused_streaming_state(method: MergeMethod, tensor: StreamTensor) -> ReplicaAccumulator | None:
    """The fused accumulator of ``tensor`` under ``method``, or ``None`` when no fused kernel
    covers it (then the method's :meth:`~..methods.MergeMethod.streaming` form merges it).

    Example:
        >>> from lightning_selmerge.merging import KeyedRandom
        >>> from lightning_selmerge.merging.kernels import use_kernels
        >>> tensor = StreamTensor("w", "w", torch.float32, 8, 2, KeyedRandom(0), None, 8,
        ...                       lambda piece, position, start: None)
        >>> with use_kernels("torch"):
        ...     fused_streaming_state(ParameterSelection(), tensor) is None
        True
    """
    backend = fused_backend(method, tensor.dtype, "cpu", _STREAMING_MODULE)
    if backend is None:
        return None
    if isinstance(method, ParameterSelection):
        if method.resample > 0 and tensor.base is None:
            return None  # the torch state names what is missing
        return FusedCandidateState(method, tensor, backend)
    return FusedRunningSum(method, tensor, backend)


def _contiguous(flat: torch.Tensor) -> torch.Tensor:
    return flat if flat.is_contiguous() else flat.contiguous()


class FusedCandidateState(CandidateState):
    """:class:`CandidateState` with the candidates drawn, and each replica folded, in one pass."""

    def __init__(
        self, method: ParameterSelection, tensor: StreamTensor, backend: ModuleType
    ) -> None:
        self.backend = backend
        super().__init__(method, tensor)

    def draw_candidates(self) -> torch.Tensor:
        tensor = self.tensor
        spec = DrawSpec.of(self.method, tensor.context(0), tensor.num_replicas)
        return self.backend.draw_candidates(spec, tensor.numel, tensor.num_replicas)

    def add(self, position: int, flat: torch.Tensor) -> None:
        flat = _contiguous(flat)
        resample = self.count > 1
        finite = self.backend.fold_selection(
            self.candidates,
            position,
            bit_view(flat),
            bit_view(self.base) if resample else None,
            bit_view(self.out),
            self.won if resample else None,
            NONFINITE_MASKS[flat.dtype],
        )
        if not finite:  # raise what the torch state raises, naming the first bad chunk
            for begin, end in self.tensor.chunks():
                self.tensor.check_finite(flat[begin:end], position, begin)


class FusedRunningSum(RunningSum):
    """:class:`RunningSum` of the plain mean with each replica added, and the sum divided, in
    one pass."""

    def __init__(self, method: WeightedAverage, tensor: StreamTensor, backend: ModuleType) -> None:
        self.backend, self.fed = backend, False
        super().__init__(method, tensor)

    def new_sum(self) -> torch.Tensor:
        """Not zeroed: the first replica fed sets it (one pass over fresh memory, not two)."""
        return torch.empty(self.tensor.numel, dtype=self.compute)

    def add(self, position: int, flat: torch.Tensor) -> None:
        self.backend.add_to_sum(self.sum, _contiguous(flat), first=not self.fed)
        self.fed = True

    def finish(self) -> torch.Tensor:
        if not self.fed:
            self.sum.zero_()
        out = torch.empty(self.tensor.numel, dtype=self.tensor.dtype)
        if not self.backend.divide_sum(self.sum, float(self.total), out):
            for begin, end in self.tensor.chunks():
                self.check_output(out[begin:end], begin, end)
        del self.sum
        return out
