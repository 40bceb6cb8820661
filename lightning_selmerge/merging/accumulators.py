"""Per-tensor state of the streaming merge: one accumulator per tensor, fed replica by replica.

:class:`~.streaming.StreamingMerge` builds one per tensor. A floating-point tensor is merged by
its method's streaming form (:meth:`~.methods.MergeMethod.streaming`: e.g. a running sum for the
average, the candidates for selection), whose result equals the all-at-once merge bit for bit;
an integer or bool tensor is replica 0's, checked against every later replica. A method without
a streaming form is refused with the alternatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .alignment import copied_tensor_differs, same_bits
from .errors import AverageNotFinite, MergeError
from .finite import all_finite, check_finite
from .kernels.streaming import fused_streaming_state
from .methods import MergeMethod, ReplicaAccumulator, StreamingForm, StreamTensor
from .plan import MergePlan
from .rules import MergeRule
from .safetensors_io import TensorInfo

__all__ = [
    "AverageNotFinite",
    "make_accumulator",
    "method_of",
    "state_bytes",
    "streaming_form",
    "without_streaming_form",
]


class _Accumulator:
    """One tensor's merge state; replicas are fed in order, positions ``0 .. K-1``."""

    def __init__(self, name: str, info: TensorInfo, labels: Sequence[str], indices: Sequence[int]):
        self.name, self.info, self.labels, self.indices = name, info, labels, indices
        self.fed = 0

    def feed(self, tensor: torch.Tensor) -> None:
        position = self.fed
        if position >= len(self.labels):
            raise MergeError(f"tensor {self.name!r}: more than {len(self.labels)} replicas fed")
        if tensor.dtype != self.info.dtype or tuple(tensor.shape) != self.info.shape:
            raise MergeError(
                f"tensor {self.name!r}: {tensor.dtype} {tuple(tensor.shape)} in "
                f"{self.labels[position]} but {self.info.dtype} {self.info.shape} in "
                f"{self.labels[0]}: the inputs must be the same architecture and dtype"
            )
        self._feed(position, tensor.reshape(-1))
        self.fed += 1

    def result(self) -> torch.Tensor:
        if self.fed != len(self.labels):
            raise MergeError(
                f"tensor {self.name!r}: {self.fed} of {len(self.labels)} replicas were fed"
            )
        return self._result().view(self.info.shape)

    def check_finite(self, piece: torch.Tensor, position: int, start: int) -> None:
        """:class:`NonFiniteError` naming the replica fed at ``position`` when ``piece`` (its
        flat elements from ``start``) holds NaN/Inf."""
        if not all_finite(piece):
            check_finite(
                self.name, [piece], [self.labels[position]], start, [self.indices[position]]
            )

    def _feed(self, position: int, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def _result(self) -> torch.Tensor:
        raise NotImplementedError


class _ExactCopy(_Accumulator):
    """Integer, bool, complex and empty tensors: replica 0's, checked equal in every replica."""

    value: torch.Tensor

    def _feed(self, position: int, flat: torch.Tensor) -> None:
        if position == 0:
            self.value = flat.clone()
        elif not same_bits(flat, self.value):
            raise copied_tensor_differs(
                self.name, self.info.dtype, self.labels[0], self.labels[position]
            )

    def _result(self) -> torch.Tensor:
        return self.value


class _Streamed(_Accumulator):
    """A floating-point tensor merged by its method's :class:`StreamingForm`."""

    state: ReplicaAccumulator

    def _feed(self, position: int, flat: torch.Tensor) -> None:
        self.state.add(position, flat)

    def _result(self) -> torch.Tensor:
        return self.state.finish()


def without_streaming_form(
    method: MergeMethod, rules: Sequence[MergeRule] = ()
) -> list[MergeMethod]:
    """The methods among ``method`` and the rules' that have no streaming form (e.g. TIES)."""
    return [m for m in [method, *(rule.method for rule in rules)] if m.streaming() is None]


def streaming_form(name: str, method: MergeMethod) -> StreamingForm:
    """``method``'s streaming form, or the :class:`MergeError` naming the alternatives."""
    form = method.streaming()
    if form is None:
        raise MergeError(
            f"tensor {name!r}: {method} has no streaming form (it needs every replica at once): "
            "merge without streaming (lightning-selmerge merge --streaming false, or "
            "merge_checkpoints / merge_state_dicts)"
        )
    return form


def method_of(name: str, info: TensorInfo, plan: MergePlan) -> MergeMethod | None:
    """The method merging ``name`` (checked to have a streaming form), ``None`` for tensors
    that are copied."""
    if not info.dtype.is_floating_point or info.numel == 0:
        return None
    chosen = plan.method_for(name)
    streaming_form(name, chosen)
    return chosen


def state_bytes(info: TensorInfo, method: MergeMethod | None) -> int:
    """Bytes an accumulator holds for a tensor (the output included)."""
    if method is None:
        return info.numel * info.dtype.itemsize
    return streaming_form("", method).state_bytes(info.dtype, info.numel)


def make_accumulator(
    name: str,
    info: TensorInfo,
    plan: MergePlan,
    base: Mapping[str, torch.Tensor] | None,
    labels: Sequence[str],
    indices: Sequence[int],
    chunk_numel: int,
    draw_prefix: str = "",
) -> _Accumulator:
    """The accumulator merging tensor ``name`` (checks the base tensor when one is needed)."""
    chosen = method_of(name, info, plan)
    if chosen is None:
        return _ExactCopy(name, info, labels, indices)
    base_tensor = plan.base_for(name, base, "base=<pre-trained state dict>")
    if base_tensor is not None and (
        base_tensor.dtype != info.dtype or tuple(base_tensor.shape) != info.shape
    ):
        raise MergeError(
            f"tensor {name!r}: {base_tensor.dtype} {tuple(base_tensor.shape)} in "
            f"the base but {info.dtype} {info.shape} in {labels[0]}"
        )
    accumulator = _Streamed(name, info, labels, indices)
    tensor = StreamTensor(
        name=name,
        draw_name=draw_prefix + name,
        dtype=info.dtype,
        numel=info.numel,
        num_replicas=len(labels),
        rng=plan.rng,
        base=None if base_tensor is None else base_tensor.reshape(-1),
        chunk_numel=chunk_numel,
        check_finite=accumulator.check_finite,
    )
    fused = fused_streaming_state(chosen, tensor)
    accumulator.state = fused or streaming_form(name, chosen).start(tensor)
    return accumulator
