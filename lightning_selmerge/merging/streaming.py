"""Streaming merge: replicas fed one at a time, in replica order, with memory independent of K.

The result is bit-identical to :func:`~lightning_selmerge.merging.merge_state_dicts` (and so to
:func:`~lightning_selmerge.merging.merge_checkpoints`) with the same arguments, for every method,
chunk size, K, probabilities and resample. Per tensor the merge holds:

* **weighted average**: a float32 (float64 for float64 tensors) running sum, each replica added
  chunk by chunk with the very float ops of ``WeightedAverage.merge_chunk`` (``add_`` unweighted,
  ``addcmul_`` weighted, then ``div_``), so the same sum in the same order;
* **selection**: the output (initialised to the base when ``resample > 0``), every element's
  ``resample + 1`` candidate replicas (:func:`~.candidates.selection_candidates`, one byte each)
  and a byte per element: the position of the earliest candidate known to have moved from the
  base (stored as ``resample + 1 - position``, 0 while none is known). Replica ``k`` writes
  the elements where it is candidate ``j`` below that position and its value moved; without
  resample, where it is candidate 0. No arithmetic touches the values:
  bit patterns are copied;
* **integer and bool tensors**: replica 0's copy, compared with every later replica.

NaN/Inf: a selection or copy raises :class:`NonFiniteError` naming the replica as soon as a
chunk holding one is fed. An average adds replicas blindly and checks its output at the end (as
the all-at-once merge does); a non-finite output raises :class:`AverageNotFinite`, and the
drivers (:func:`merge_state_dicts_streaming`, :func:`.streaming_files.merge_checkpoints_streaming`)
read that range of each replica again to name the culprits, or to report an overflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

import torch

from .candidates import selection_candidates
from .errors import MergeError, NonFiniteError
from .finite import NonFinite, all_finite, check_finite, check_nonfinite_mode, surviving_replicas
from .keyed_random import KeyedRandom
from .methods import ChunkContext, MergeMethod, ParameterSelection, WeightedAverage
from .rules import MergeRule, method_for
from .safetensors_io import TensorInfo
from .scratch import per_thread_buffer, scratch_scope
from .state_dict import DEFAULT_CHUNK_NUMEL, check_same_names
from .ties import tie_groups

__all__ = [
    "DEFAULT_WINDOW_BYTES",
    "AverageNotFinite",
    "ReplicaReader",
    "StreamingMerge",
    "merge_state_dicts_streaming",
    "stream_merge",
]

#: Bytes of merge state (outputs, sums, candidates, base copies) held at once by the drivers.
DEFAULT_WINDOW_BYTES = 1 << 30

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
        if method.resample > 0:
            if base is None:
                raise MergeError(
                    f"{name}: selection with resample={method.resample} needs the base "
                    "(pre-trained) weights: pass base=..."
                )
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


def _state_bytes(info: TensorInfo, method: MergeMethod | None) -> int:
    """Bytes an accumulator holds for a tensor (the output included)."""
    size = info.dtype.itemsize
    if isinstance(method, WeightedAverage):
        per_element = size + (8 if info.dtype == torch.float64 else 4)
    elif isinstance(method, ParameterSelection):
        per_element = size + method.resample + 1 + (2 * size + 1 if method.resample else 0)
    else:
        per_element = size
    return info.numel * per_element


def _method_of(name: str, info: TensorInfo, method: MergeMethod, rules) -> MergeMethod | None:
    """The method merging ``name``, ``None`` for tensors that are copied."""
    if not info.dtype.is_floating_point or info.numel == 0:
        return None
    chosen = method_for(name, rules, method)
    if not isinstance(chosen, WeightedAverage | ParameterSelection):
        raise MergeError(
            f"tensor {name!r}: the streaming merge knows weighted average and selection, not "
            f"{type(chosen).__name__}; merge with merge_checkpoints instead"
        )
    return chosen


class StreamingMerge:
    """Merge K replicas of the tensors in ``plan`` fed one replica at a time, in replica order.

    Args:
        plan: ``(name, TensorInfo)`` of each tensor to merge (replica 0's tensors).
        num_replicas: K, the replicas that will be fed.
        method, rules, seed, chunk_numel: as in :func:`merge_state_dicts`.
        base: the base tensors (needed by selection with resample) by name.
        labels, indices: each replica's name in errors and index in
            :attr:`NonFiniteError.replicas` (default ``replica k`` and ``k``).
        draw_prefix: prepended to a tensor's name to key its random draws (e.g. ``"model."``
            to merge a Hugging Face directory exactly as the in-process ensemble of a
            LightningModule holding it as ``self.model`` does).

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> from lightning_selmerge.merging.safetensors_io import TensorInfo
        >>> replicas = [{"w": torch.randn(5)} for _ in range(3)]
        >>> merge = StreamingMerge([("w", TensorInfo(torch.float32, (5,)))], num_replicas=3)
        >>> for replica in replicas:
        ...     merge.feed(replica)
        >>> torch.equal(merge.result()["w"], merge_state_dicts(replicas)["w"])
        True
    """

    def __init__(
        self,
        plan: Sequence[tuple[str, TensorInfo]],
        *,
        num_replicas: int,
        method: MergeMethod | None = None,
        rules: Sequence[MergeRule] = (),
        seed: int = 0,
        base: Mapping[str, torch.Tensor] | None = None,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
        labels: Sequence[str] | None = None,
        indices: Sequence[int] | None = None,
        draw_prefix: str = "",
    ) -> None:
        method = method if method is not None else ParameterSelection()
        if chunk_numel < 1:
            raise MergeError(f"chunk_numel must be >= 1, got {chunk_numel}")
        for candidate in {id(m): m for m in [method, *(r.method for r in rules)]}.values():
            candidate.validate(num_replicas)
        labels = (
            list(labels) if labels is not None else [f"replica {k}" for k in range(num_replicas)]
        )
        indices = list(indices) if indices is not None else list(range(num_replicas))
        if len(labels) != num_replicas or len(indices) != num_replicas:
            raise MergeError(f"give one label and index per replica ({num_replicas})")
        self.labels = labels
        rng = KeyedRandom(seed)
        self._accumulators: dict[str, _Accumulator] = {}
        for name, info in plan:
            chosen = _method_of(name, info, method, rules)
            if chosen is None:
                acc: _Accumulator = _ExactCopy(name, info, labels, indices)
            elif isinstance(chosen, WeightedAverage):
                acc = _Average(name, info, labels, indices, chosen, chunk_numel)
            else:
                base_tensor = None
                if chosen.needs_base:
                    base_tensor = base.get(name) if base is not None else None
                    if base_tensor is None:
                        raise MergeError(
                            f"tensor {name!r}: {chosen} needs the base (pre-trained) weights, "
                            "but no base tensor was given: pass base=<pre-trained state dict>"
                        )
                    if base_tensor.dtype != info.dtype or tuple(base_tensor.shape) != info.shape:
                        raise MergeError(
                            f"tensor {name!r}: {base_tensor.dtype} {tuple(base_tensor.shape)} in "
                            f"the base but {info.dtype} {info.shape} in {labels[0]}"
                        )
                acc = _Selection(
                    name,
                    info,
                    labels,
                    indices,
                    chosen,
                    rng,
                    draw_prefix + name,
                    base_tensor,
                    chunk_numel,
                )
            self._accumulators[name] = acc

    def feed_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Feed the next replica's ``name`` (replicas in order, each tensor once per replica)."""
        accumulator = self._accumulators.get(name)
        if accumulator is None:
            raise MergeError(f"tensor {name!r} is not in the merge plan")
        with scratch_scope():
            accumulator.feed(tensor)

    def feed(self, replica: Mapping[str, torch.Tensor]) -> None:
        """Feed every planned tensor of the next replica."""
        for name in self._accumulators:
            self.feed_tensor(name, replica[name])

    def result(self) -> dict[str, torch.Tensor]:
        """The merged tensors, once every replica has been fed (frees the merge state).

        Raises :class:`AverageNotFinite` when an average's output is not finite.
        """
        with scratch_scope():
            return {name: acc.result() for name, acc in self._accumulators.items()}


class ReplicaReader(Protocol):
    """One replica's tensors by name (a :class:`~.safetensors_io.CheckpointReader` is one)."""

    def tensor(self, name: str) -> torch.Tensor: ...

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None: ...


OpenReplica = Callable[[int], AbstractContextManager[ReplicaReader]]


def _windows(
    plan: Sequence[tuple[str, TensorInfo]],
    method: MergeMethod,
    rules: Sequence[MergeRule],
    window_bytes: int,
) -> Iterator[list[tuple[str, TensorInfo]]]:
    """Consecutive runs of the plan whose merge state fits ``window_bytes`` (at least a tensor)."""
    window: list[tuple[str, TensorInfo]] = []
    size = 0
    for name, info in plan:
        need = _state_bytes(info, _method_of(name, info, method, rules))
        if window and size + need > window_bytes:
            yield window
            window, size = [], 0
        window.append((name, info))
        size += need
    if window:
        yield window


def stream_merge(
    plan: Sequence[tuple[str, TensorInfo]],
    open_replica: OpenReplica,
    replicas: Sequence[int],
    labels: Sequence[str],
    write: Callable[[str, torch.Tensor], object],
    *,
    method: MergeMethod,
    rules: Sequence[MergeRule] = (),
    seed: int = 0,
    open_base: Callable[[], AbstractContextManager[ReplicaReader]] | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    draw_prefix: str = "",
) -> None:
    """Merge ``plan`` window by window: per window, open each replica in turn (one at a time).

    ``open_replica(k)`` opens replica ``k`` for reading (a context manager); ``replicas`` are the
    indices to merge, in order, ``labels`` their names in errors. ``write(name, tensor)`` gets
    every merged tensor in plan order. Pages of a replica's tensors are released once fed.
    ``method`` and ``rules`` are for these replicas (see :meth:`MergeMethod.subset`).
    """
    for window in _windows(plan, method, rules, window_bytes):
        base: dict[str, torch.Tensor] = {}
        if open_base is not None:
            with open_base() as reader:
                for name, info in window:
                    chosen = _method_of(name, info, method, rules)
                    if chosen is not None and chosen.needs_base:
                        base[name] = reader.tensor(name).clone()
                        reader.release(name)
        merge = StreamingMerge(
            window,
            num_replicas=len(replicas),
            method=method,
            rules=rules,
            seed=seed,
            base=base,
            chunk_numel=chunk_numel,
            labels=labels,
            indices=replicas,
            draw_prefix=draw_prefix,
        )
        del base
        for k in replicas:
            with open_replica(k) as reader:
                for name, _ in window:
                    merge.feed_tensor(name, reader.tensor(name))
                    reader.release(name)
        try:
            merged = merge.result()
        except AverageNotFinite as err:
            _locate_nonfinite(err, open_replica, replicas, labels)
        del merge
        for name, _ in window:
            write(name, merged.pop(name))


def _locate_nonfinite(
    err: AverageNotFinite, open_replica: OpenReplica, replicas: Sequence[int], labels
) -> None:
    """Read the failing range of every replica again: raise :class:`NonFiniteError` naming the
    replicas holding NaN/Inf there, else the overflow :class:`MergeError`."""
    bad, pieces = [], []
    for position, k in enumerate(replicas):
        with open_replica(k) as reader:
            piece = reader.tensor(err.name).reshape(-1)[err.start : err.stop].clone()
            reader.release(err.name)
        if not all_finite(piece):
            bad.append(position)
            pieces.append(piece)
    if bad:
        check_finite(
            err.name,
            pieces,
            [labels[p] for p in bad],
            err.start,
            [replicas[p] for p in bad],
        )
    raise MergeError(
        f"tensor {err.name!r}: {err.method} of finite replicas overflowed near flat index "
        f"{err.start}: cast the replicas to float64 before merging"
    ) from None


class _StateReader:
    """A state dict as a :class:`ReplicaReader`."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def tensor(self, name: str) -> torch.Tensor:
        return self.state[name]

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        pass


def merge_state_dicts_streaming(
    replicas: Sequence[Mapping[str, torch.Tensor]] | Callable[[int], Mapping[str, torch.Tensor]],
    *,
    num_replicas: int | None = None,
    method: MergeMethod | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    rules: Sequence[MergeRule] = (),
    seed: int = 0,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    nonfinite: NonFinite = "error",
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    draw_prefix: str = "",
) -> dict[str, torch.Tensor]:
    """:func:`merge_state_dicts`, bit for bit, reading the replicas one at a time.

    ``replicas``: the K state dicts, or a function ``load(k)`` returning replica ``k`` (called
    once per replica and window, so it may load from disk and let the state go; pass
    ``num_replicas`` then). Tied tensors (shared storage in replica 0) are merged once, keyed by
    their canonical name (:mod:`.ties`), and stay tied. Other arguments as in
    :func:`merge_state_dicts`; ``draw_prefix`` as in :class:`StreamingMerge`.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import merge_state_dicts
        >>> states = [{"w": torch.randn(6)} for _ in range(5)]
        >>> same = merge_state_dicts_streaming(states, seed=3)["w"]
        >>> torch.equal(same, merge_state_dicts(states, seed=3)["w"])
        True
    """
    method = method if method is not None else ParameterSelection()
    check_nonfinite_mode(nonfinite)
    if callable(replicas):
        if num_replicas is None:
            raise MergeError("pass num_replicas with a replica loader")
        load = replicas
    else:
        num_replicas = len(replicas) if num_replicas is None else num_replicas
        if num_replicas != len(replicas):
            raise MergeError(f"num_replicas={num_replicas} but {len(replicas)} replicas given")
        load = replicas.__getitem__
    labels = [f"replica {k}" for k in range(num_replicas)]
    first = load(0)
    groups = tie_groups(first)
    plan = [(key, TensorInfo(first[key].dtype, tuple(first[key].shape))) for key in groups]
    order = list(first)
    names = set(order)
    del first

    @contextmanager
    def open_replica(k: int) -> Iterator[ReplicaReader]:
        state = load(k)
        check_same_names([names, set(state)], [labels[0], labels[k]])
        yield _StateReader(state)

    def run(keep: Sequence[int], method: MergeMethod, rules: Sequence[MergeRule]) -> dict:
        merged: dict[str, torch.Tensor] = {}
        stream_merge(
            plan,
            open_replica,
            keep,
            [labels[k] for k in keep],
            merged.__setitem__,
            method=method,
            rules=rules,
            seed=seed,
            open_base=None if base is None else lambda: nullcontext(_StateReader(base)),
            chunk_numel=chunk_numel,
            window_bytes=window_bytes,
            draw_prefix=draw_prefix,
        )
        by_name = {name: merged[key] for key, group in groups.items() for name in group}
        return {name: by_name[name] for name in order}

    everyone = list(range(num_replicas))
    try:
        return run(everyone, method, rules)
    except NonFiniteError:
        if nonfinite == "error":
            raise
    bad = find_nonfinite_streaming(open_replica, everyone, plan)
    keep = surviving_replicas(bad, labels)
    return run(keep, method.subset(keep), [rule.subset(keep) for rule in rules])


def find_nonfinite_streaming(
    open_replica: OpenReplica, replicas: Sequence[int], plan: Sequence[tuple[str, TensorInfo]]
) -> dict[int, str]:
    """Replica index -> its first floating-point tensor holding NaN/Inf, one replica at a time."""
    found: dict[int, str] = {}
    for k in replicas:
        with open_replica(k) as reader:
            for name, info in plan:
                if info.dtype.is_floating_point:
                    finite = all_finite(reader.tensor(name))
                    reader.release(name)
                    if not finite:
                        found[k] = name
                        break
    return found
