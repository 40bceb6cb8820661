"""Streaming merge: replicas fed one at a time, in replica order, with memory independent of K.

The result is bit-identical to :func:`~lightning_selmerge.merging.merge_state_dicts` (and so to
:func:`~lightning_selmerge.merging.merge_checkpoints`) with the same arguments, for every method
with a streaming form (:meth:`~.methods.MergeMethod.streaming`), chunk size and K. What is
merged how follows the :class:`~.plan.MergePlan` the other drivers follow; per tensor the merge
holds its method's state (:mod:`.accumulators`), e.g.

* **weighted average**: a float32 (float64 for float64 tensors) running sum
  (:mod:`.methods.average_streaming`);
* **selection**: the output, every element's candidate replicas and, with resample, the
  earliest moved candidate per element (:mod:`.methods.selection_streaming`);
* **integer and bool tensors**: replica 0's copy, compared with every later replica.

NaN/Inf: a selection or copy raises :class:`NonFiniteError` naming the replica as soon as a
chunk holding one is fed. An average adds replicas blindly and checks its output at the end (as
the all-at-once merge does); a non-finite output raises :class:`AverageNotFinite`, and the
drivers (:func:`merge_state_dicts_streaming`, :func:`.streaming_files.merge_checkpoints_streaming`)
read that range of each replica again to name the culprits, or to report an overflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Protocol

import torch

from .accumulators import AverageNotFinite, make_accumulator, method_of, state_bytes
from .alignment import check_same_names
from .errors import MergeError, overflow_fix
from .finite import NonFinite, all_finite, check_finite
from .kernels.dispatch import merge_size
from .methods import MergeMethod
from .plan import MergePlan, check_same_ties, merge_dropping_nonfinite, tie_groups
from .rules import MergeRule
from .safetensors_io import TensorInfo, floating_nbytes
from .scratch import scratch_scope
from .tensor_merge import DEFAULT_CHUNK_NUMEL

__all__ = [
    "DEFAULT_WINDOW_BYTES",
    "STATE_DICT_WINDOW_BYTES",
    "AverageNotFinite",
    "ReplicaReader",
    "StreamingMerge",
    "merge_state_dicts_streaming",
    "stream_merge",
]

#: Bytes of merge state (outputs, sums, candidates) held at once by the drivers. Smaller
#: windows were as fast or faster (1 GiB, 256 and 128 MiB measured) and let the merge run in a
#: tighter memory limit: the state is anonymous memory, unlike the mapped replicas' pages
#: (docs/performance.md).
DEFAULT_WINDOW_BYTES = 256 << 20
#: ... of :func:`merge_state_dicts_streaming`, whose ``load(k)`` runs once per replica and
#: window: a larger window loads each replica fewer times.
STATE_DICT_WINDOW_BYTES = 1 << 30


class StreamingMerge:
    """Merge K replicas of the tensors in ``plan`` fed one replica at a time, in replica order.

    Args:
        plan: ``(name, TensorInfo)`` of each tensor to merge (replica 0's tensors).
        num_replicas: K, the replicas that will be fed.
        method, rules, seed, chunk_numel: as in :func:`merge_state_dicts`.
        base: the base tensors (needed by selection with resample) by name; they are read
            while the replicas are fed: keep them unchanged until :meth:`result`.
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
        self._setup(
            plan,
            MergePlan.create(method, rules, seed, num_replicas),
            base,
            chunk_numel,
            labels,
            indices,
            draw_prefix,
        )

    @classmethod
    def of_plan(
        cls,
        tensors: Sequence[tuple[str, TensorInfo]],
        plan: MergePlan,
        *,
        base: Mapping[str, torch.Tensor] | None = None,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
        labels: Sequence[str] | None = None,
        indices: Sequence[int] | None = None,
        draw_prefix: str = "",
    ) -> StreamingMerge:
        """The streaming merge of ``tensors`` following a validated :class:`MergePlan`."""
        merge = cls.__new__(cls)
        merge._setup(tensors, plan, base, chunk_numel, labels, indices, draw_prefix)
        return merge

    def _setup(
        self,
        tensors: Sequence[tuple[str, TensorInfo]],
        plan: MergePlan,
        base: Mapping[str, torch.Tensor] | None,
        chunk_numel: int,
        labels: Sequence[str] | None,
        indices: Sequence[int] | None,
        draw_prefix: str,
    ) -> None:
        if chunk_numel < 1:
            raise MergeError(f"chunk_numel must be >= 1, got {chunk_numel}")
        count = plan.num_replicas
        labels = list(labels) if labels is not None else [f"replica {k}" for k in range(count)]
        indices = list(indices) if indices is not None else list(range(count))
        if len(labels) != count or len(indices) != count:
            raise MergeError(f"give one label and index per replica ({count})")
        self.labels = labels
        plan = plan.with_rule_prefix(draw_prefix, (name for name, _ in tensors))
        self._accumulators = {
            name: make_accumulator(
                name, info, plan, base, labels, indices, chunk_numel, draw_prefix
            )
            for name, info in tensors
        }

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
    tensors: Sequence[tuple[str, TensorInfo]], plan: MergePlan, window_bytes: int
) -> Iterator[list[tuple[str, TensorInfo]]]:
    """Consecutive runs of ``tensors`` whose merge state fits ``window_bytes`` (at least one)."""
    window: list[tuple[str, TensorInfo]] = []
    size = 0
    for name, info in tensors:
        need = state_bytes(info, method_of(name, info, plan))
        if window and size + need > window_bytes:
            yield window
            window, size = [], 0
        window.append((name, info))
        size += need
    if window:
        yield window


def _reads_base(name: str, info: TensorInfo, plan: MergePlan) -> bool:
    chosen = method_of(name, info, plan)
    return chosen is not None and chosen.needs_base


def stream_merge(
    tensors: Sequence[tuple[str, TensorInfo]],
    open_replica: OpenReplica,
    replicas: Sequence[int],
    labels: Sequence[str],
    write: Callable[[str, torch.Tensor], object],
    *,
    plan: MergePlan,
    open_base: Callable[[], AbstractContextManager[ReplicaReader]] | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    draw_prefix: str = "",
) -> None:
    """Merge ``tensors`` window by window: per window, open each replica in turn (one at a time).

    ``open_replica(k)`` opens replica ``k`` for reading (a context manager); ``replicas`` are the
    indices to merge, in order, ``labels`` their names in errors. ``write(name, tensor)`` gets
    every merged tensor in ``tensors``' order. Pages of a replica's tensors are released once
    fed. ``plan`` is for these replicas (see :meth:`MergePlan.subset`).
    """
    plan = plan.with_rule_prefix(draw_prefix, (name for name, _ in tensors))
    with merge_size(len(replicas) * floating_nbytes(tensors)):
        for window in _windows(tensors, plan, window_bytes):
            with ExitStack() as stack:
                # the base stays open (a memory map, not a copy) while the window's replicas are fed
                base: dict[str, torch.Tensor] = {}
                reads_base = [name for name, info in window if _reads_base(name, info, plan)]
                if open_base is not None and reads_base:
                    base_reader = stack.enter_context(open_base())
                    base = {name: base_reader.tensor(name) for name in reads_base}
                merge = StreamingMerge.of_plan(
                    window,
                    plan,
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
            dtype = piece.dtype
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
        f"tensor {err.name!r}: {err.method} of finite replicas overflowed {dtype} near flat "
        f"index {err.start}: {overflow_fix(dtype, err.method)}"
    ) from None


class _StateReader:
    """A state dict as a :class:`ReplicaReader`."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def tensor(self, name: str) -> torch.Tensor:
        return self.state[name].detach()  # parameters: no autograd graph

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
    window_bytes: int = STATE_DICT_WINDOW_BYTES,
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
    if callable(replicas):
        if num_replicas is None:
            raise MergeError("pass num_replicas with a replica loader")
        load = replicas
    else:
        num_replicas = len(replicas) if num_replicas is None else num_replicas
        if num_replicas != len(replicas):
            raise MergeError(f"num_replicas={num_replicas} but {len(replicas)} replicas given")
        load = replicas.__getitem__
    plan = MergePlan.create(method, rules, seed, num_replicas)
    labels = [f"replica {k}" for k in range(num_replicas)]
    first = load(0)
    groups = tie_groups(first)
    tensors = [(key, TensorInfo(first[key].dtype, tuple(first[key].shape))) for key, _ in groups]
    order = list(first)
    names = set(order)
    del first

    @contextmanager
    def open_replica(k: int) -> Iterator[ReplicaReader]:
        state = load(k)
        check_same_names([names, set(state)], [labels[0], labels[k]])
        check_same_ties(groups, state, (labels[0], labels[k]))
        yield _StateReader(state)

    def attempt(plan: MergePlan, keep: Sequence[int]) -> dict[str, torch.Tensor]:
        merged: dict[str, torch.Tensor] = {}
        stream_merge(
            tensors,
            open_replica,
            keep,
            [labels[k] for k in keep],
            merged.__setitem__,
            plan=plan,
            open_base=None if base is None else lambda: nullcontext(_StateReader(base)),
            chunk_numel=chunk_numel,
            window_bytes=window_bytes,
            draw_prefix=draw_prefix,
        )
        by_name = {name: merged[key] for key, group in groups for name in group}
        return {name: by_name[name] for name in order}

    return merge_dropping_nonfinite(
        plan,
        attempt,
        nonfinite=nonfinite,
        labels=labels,
        find_bad=lambda: find_nonfinite_streaming(open_replica, range(num_replicas), tensors),
    )


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
