"""Per-tensor state of the streaming merge: one accumulator per tensor, fed replica by replica.

:class:`~.streaming.StreamingMerge` builds one per tensor; see :mod:`.streaming` for what each
holds and why the result equals the all-at-once merge bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .candidates import selection_candidates
from .errors import MergeError
from .finite import all_finite, check_finite
from .keyed_random import KeyedRandom
from .methods import ChunkContext, MergeMethod, ParameterSelection, WeightedAverage
from .plan import MergePlan
from .safetensors_io import TensorInfo
from .scratch import per_thread_buffer

__all__ = ["AverageNotFinite", "make_accumulator", "method_of", "state_bytes"]

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BITS_DTYPE[tensor.element_size()])


class AverageNotFinite(MergeError):
    """An average's output holds NaN/Inf in flat elements ``start:stop`` of tensor ``name``:
    some replica holds NaN/Inf there, or the finite sum overflowed the tensor's dtype."""

    def __init__(self, name: str, start: int, stop: int, method: MergeMethod) -> None:
        super().__init__(
            f"tensor {name!r}: {method} is not finite near flat index {start}: a replica holds "
            "NaN/Inf, or the sum overflowed (cast the replicas to float64 before merging)"
        )
        self.name, self.start, self.stop, self.method = name, start, stop, method


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

    def _check_finite(self, piece: torch.Tensor, position: int, start: int) -> None:
        if not all_finite(piece):
            check_finite(
                self.name, [piece], [self.labels[position]], start, [self.indices[position]]
            )

    def _feed(self, position: int, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def _result(self) -> torch.Tensor:
        raise NotImplementedError


class _ExactCopy(_Accumulator):
    """Integer/bool (and empty) tensors: replica 0's, after checking every replica equals it."""

    value: torch.Tensor

    def _feed(self, position: int, flat: torch.Tensor) -> None:
        if position == 0:
            self.value = flat.clone()
        elif not torch.equal(flat, self.value):
            raise MergeError(
                f"non-float tensor {self.name!r} ({self.info.dtype}) differs between "
                f"{self.labels[0]} and {self.labels[position]}: integer and bool buffers are "
                "copied, never merged, so they must be equal"
            )

    def _result(self) -> torch.Tensor:
        return self.value


class _Average(_Accumulator):
    """A running float32/float64 sum with ``WeightedAverage.merge_chunk``'s ops, chunk by chunk."""

    def __init__(self, name, info, labels, indices, method: WeightedAverage, chunk_numel: int):
        super().__init__(name, info, labels, indices)
        self.method, self.chunk_numel = method, chunk_numel
        self.compute = torch.float64 if info.dtype == torch.float64 else torch.float32
        weights = torch.tensor(
            method.weights if method.weights is not None else [1.0] * len(labels),
            dtype=self.compute,
        )
        self.weights, self.total = weights.unbind(0), weights.sum()
        self.sum = torch.zeros(info.numel, dtype=self.compute)
        self.widen = info.dtype.itemsize == 1  # float8 takes no part in type promotion

    def _feed(self, position: int, flat: torch.Tensor) -> None:
        for begin in range(0, flat.numel(), self.chunk_numel):
            end = min(begin + self.chunk_numel, flat.numel())
            piece = flat[begin:end].to(self.compute) if self.widen else flat[begin:end]
            if self.method.weights is None:
                self.sum[begin:end].add_(piece)
            else:
                self.sum[begin:end].addcmul_(piece, self.weights[position])

    def _result(self) -> torch.Tensor:
        out = torch.empty(self.info.numel, dtype=self.info.dtype)
        for begin in range(0, out.numel(), self.chunk_numel):
            end = min(begin + self.chunk_numel, out.numel())
            merged = out[begin:end].copy_(self.sum[begin:end].div_(self.total))
            if not all_finite(merged):
                raise AverageNotFinite(self.name, begin, end, self.method)
        del self.sum
        return out


class _Selection(_Accumulator):
    """Output + candidates + (with resample) the earliest moved candidate's position per element.

    Replica ``k`` wins an element when it is the earliest candidate that moved; fed in order,
    each replica overwrites the elements where it is a candidate earlier than the best so far.
    """

    def __init__(
        self,
        name,
        info,
        labels,
        indices,
        method: ParameterSelection,
        rng: KeyedRandom,
        draw_name: str,
        base: torch.Tensor | None,
        chunk_numel: int,
    ):
        super().__init__(name, info, labels, indices)
        self.method, self.chunk_numel = method, chunk_numel
        numel, count = info.numel, method.resample + 1
        self.candidates = torch.empty((count, numel), dtype=torch.uint8)
        for begin in range(0, numel, chunk_numel):
            end = min(begin + chunk_numel, numel)
            ctx = ChunkContext(rng, draw_name, begin)
            self.candidates[:, begin:end] = selection_candidates(
                method, ctx, end - begin, len(labels)
            )
        if method.resample > 0:  # the plan checked that the base is given (needs_base)
            self.base = base.reshape(-1).clone()
            self.out = self.base.clone()
            # count - (position of the earliest candidate known to have moved); 0: none yet
            self.won = torch.zeros(numel, dtype=torch.uint8)
        else:
            self.out = torch.empty(numel, dtype=info.dtype)

    def _feed(self, position: int, flat: torch.Tensor) -> None:
        count = self.method.resample + 1
        out_bits, bits = _bits(self.out), _bits(flat)
        for begin in range(0, flat.numel(), self.chunk_numel):
            end = min(begin + self.chunk_numel, flat.numel())
            self._check_finite(flat[begin:end], position, begin)
            target, piece = out_bits[begin:end], bits[begin:end]
            if count == 1:
                mine = torch.eq(self.candidates[0, begin:end], position)
                torch.where(mine, piece, target, out=target)
                continue
            # score: count - (earliest j with candidate j == this replica), 0 when it is none;
            # running maxima of 0/1 hits times (count - j): no masked_fill, which is slow on CPUs
            size = end - begin
            score = per_thread_buffer("stream_score", size, torch.uint8, None).zero_()
            hit = per_thread_buffer("stream_hit", size, torch.bool, None)
            term = per_thread_buffer("stream_term", size, torch.uint8, None)
            for j in range(count):
                torch.eq(self.candidates[j, begin:end], position, out=hit)
                torch.mul(hit.view(torch.uint8), count - j, out=term)
                torch.maximum(score, term, out=score)
            won = self.won[begin:end]
            wins = torch.ne(piece, _bits(self.base)[begin:end])
            wins &= score > won
            torch.where(wins, piece, target, out=target)
            torch.where(wins, score, won, out=won)

    def _result(self) -> torch.Tensor:
        del self.candidates
        return self.out


def state_bytes(info: TensorInfo, method: MergeMethod | None) -> int:
    """Bytes an accumulator holds for a tensor (the output included)."""
    size = info.dtype.itemsize
    if isinstance(method, WeightedAverage):
        per_element = size + (8 if info.dtype == torch.float64 else 4)
    elif isinstance(method, ParameterSelection):
        per_element = size + method.resample + 1 + (2 * size + 1 if method.resample else 0)
    else:
        per_element = size
    return info.numel * per_element


def method_of(name: str, info: TensorInfo, plan: MergePlan) -> MergeMethod | None:
    """The method merging ``name``, ``None`` for tensors that are copied."""
    if not info.dtype.is_floating_point or info.numel == 0:
        return None
    chosen = plan.method_for(name)
    if not isinstance(chosen, WeightedAverage | ParameterSelection):
        raise MergeError(
            f"tensor {name!r}: the streaming merge knows weighted average and selection, not "
            f"{type(chosen).__name__}; merge with merge_checkpoints instead"
        )
    return chosen


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
    if isinstance(chosen, WeightedAverage):
        return _Average(name, info, labels, indices, chosen, chunk_numel)
    base_tensor = plan.base_for(name, base, "base=<pre-trained state dict>")
    if base_tensor is not None and (
        base_tensor.dtype != info.dtype or tuple(base_tensor.shape) != info.shape
    ):
        raise MergeError(
            f"tensor {name!r}: {base_tensor.dtype} {tuple(base_tensor.shape)} in "
            f"the base but {info.dtype} {info.shape} in {labels[0]}"
        )
    return _Selection(
        name, info, labels, indices, chosen, plan.rng, draw_prefix + name, base_tensor, chunk_numel
    )
