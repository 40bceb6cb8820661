"""Merge host-resident replicas on an accelerator: chunks staged through reusable device buffers.

The replicas stay where they are (CPU memory, ideally pinned); each chunk of the K replicas (and
of the base, when the tensor's method needs it) is copied to the device on a side copy stream
into one of ``depth`` staging sets, so that the copy of chunk ``i + 1`` runs while chunk ``i``
is merged on the compute stream. Events order the two: a merge waits until its chunk's copy
landed, a copy into a staging set waits until the merge that last read it was issued. Each chunk
is merged by :func:`~.tensor_merge.iter_merged_chunks` (the fused kernels where they cover it,
else the method's torch kernel, with the same :class:`~.methods.ChunkContext` offsets and the
same NaN/Inf checks) straight into the output tensor on the device.

Only methods whose device arithmetic is bit for bit the CPU's go through the device
(:func:`exact_on`); the others, integer and bool tensors, are merged on the CPU as by
:func:`~.state_dict.merge_state_dicts` and copied over. On the CPU device streams are no-ops and
the copies synchronous: the same pipeline runs there (the tests use it), it is just no faster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .alignment import check_aligned, check_same_names, copy_exact
from .methods import MergeMethod, ParameterSelection, WeightedAverage
from .plan import MergePlan, checked_tie_groups
from .tensor_merge import DEFAULT_CHUNK_NUMEL, iter_merged_chunks, merge_tensor

__all__ = ["DEVICE_CHUNK_NUMEL", "StagingPipeline", "exact_on", "merge_through_device"]

#: Elements per chunk on an accelerator: large enough that a chunk's copy and merge are not
#: bound by launching kernels, small enough that the staging sets (``depth * (K + 1)`` chunks)
#: cost little device memory (160 MiB for K = 4 float32 replicas and a base, depth 2).
DEVICE_CHUNK_NUMEL = 1 << 22


def exact_on(method: MergeMethod, device: torch.device | str) -> bool:
    """Whether ``method`` merged on ``device`` gives the CPU merge's bits.

    Always on the CPU. On an accelerator: selection (with any probabilities and resample),
    which copies bit patterns chosen by integer draws, and the plain mean (float32 adds in
    replica order, one IEEE division, round-to-nearest-even to the replicas' dtype: the same
    correctly rounded operations on any device). Not weights (``addcmul_`` may fuse a
    multiply-add there), task vectors, TIES or DARE: their float arithmetic may round
    differently on an accelerator, so they stay on the CPU.

    Example:
        >>> exact_on(WeightedAverage(), "cuda"), exact_on(WeightedAverage(weights=[1, 2]), "cuda")
        (True, False)
        >>> exact_on(WeightedAverage(weights=[1, 2]), "cpu")
        True
    """
    if torch.device(device).type == "cpu":
        return True
    if type(method) is ParameterSelection:
        return True
    return type(method) is WeightedAverage and method.weights is None


def _new_staging(nbytes: int, device: torch.device) -> torch.Tensor:
    """One staging buffer (raw bytes, viewed as each chunk's dtype)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


class StagingPipeline:
    """``depth`` sets of ``inputs`` device buffers of ``nbytes`` each, filled on a copy stream.

    :meth:`stage` copies a chunk's pieces into set ``slot`` (after the merge that last read it),
    :meth:`ready` makes the compute stream wait for them, :meth:`release` marks the set free once
    the merge reading it has been issued. Buffers are allocated at first use and reused for every
    later chunk: the pipeline holds at most ``depth * inputs`` of them, whatever the tensor count.

    Example:
        >>> pipeline = StagingPipeline("cpu", depth=2, inputs=1, nbytes=16)
        >>> views = pipeline.stage(0, [torch.arange(3.0)])
        >>> pipeline.ready(0)[0].tolist(), pipeline.allocations
        ([0.0, 1.0, 2.0], 1)
        >>> pipeline.release(0); pipeline.close()
    """

    def __init__(self, device: torch.device | str, *, depth: int, inputs: int, nbytes: int):
        self.device = torch.device(device)
        self.depth, self.nbytes = depth, nbytes
        self.allocations = 0
        self._buffers: list[list[torch.Tensor | None]] = [[None] * inputs for _ in range(depth)]
        self._views: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self._async = self.device.type != "cpu"
        if self._async:
            self._compute = torch.accelerator.current_stream(self.device)
            self._copy = torch.Stream(self.device)
            self._copied = [torch.Event(self.device) for _ in range(depth)]
            self._merged = [torch.Event(self.device) for _ in range(depth)]
            self._merged_recorded = [False] * depth

    def _buffer(self, slot: int, index: int) -> torch.Tensor:
        buffer = self._buffers[slot][index]
        if buffer is None:  # allocated on the compute stream, which alone reads it
            buffer = self._buffers[slot][index] = _new_staging(self.nbytes, self.device)
            self.allocations += 1
        return buffer

    def stage(self, slot: int, pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``pieces`` (flat, one dtype) into set ``slot``; views valid after :meth:`ready`."""
        dtype, nbytes = pieces[0].dtype, pieces[0].numel() * pieces[0].element_size()
        allocated = self.allocations
        views = [self._buffer(slot, j)[:nbytes].view(dtype) for j in range(len(pieces))]
        if not self._async:
            for view, piece in zip(views, pieces):
                view.copy_(piece)
        else:
            if self.allocations > allocated:
                # the caching allocator may have given a new buffer memory that kernels still
                # queued on the compute stream read (a block they freed): copy after them
                self._copy.wait_stream(self._compute)
            if self._merged_recorded[slot]:
                self._copy.wait_event(self._merged[slot])
            with self._copy:
                for view, piece in zip(views, pieces):
                    view.copy_(piece, non_blocking=True)
            self._copied[slot].record(self._copy)
        self._views[slot] = views
        return views

    def ready(self, slot: int) -> list[torch.Tensor]:
        """Set ``slot``'s views, with the compute stream ordered after their copies."""
        if self._async:
            self._compute.wait_event(self._copied[slot])
        return self._views[slot]

    def release(self, slot: int) -> None:
        """The merges reading set ``slot`` are issued: the next copy into it waits for them."""
        if self._async:
            self._merged[slot].record(self._compute)
            self._merged_recorded[slot] = True

    def close(self) -> None:
        """Wait for copies still in flight (after an error), so the buffers may be freed."""
        if self._async:
            self._copy.synchronize()


@dataclass
class _Entry:
    """One tensor (tie group) of the merge and where its result goes."""

    key: str
    names: list[str]
    shape: torch.Size
    flat: list[torch.Tensor]
    base: torch.Tensor | None
    method: MergeMethod
    prepared: Any
    out: torch.Tensor | None  # a streamed tensor's output on the device; None: merged on the CPU


def _entries(
    replicas: Sequence[Mapping[str, torch.Tensor]],
    labels: Sequence[str],
    plan: MergePlan,
    base: Mapping[str, torch.Tensor] | None,
    device: torch.device,
    chunk_numel: int,
) -> list[_Entry]:
    check_same_names([set(r) for r in replicas], labels)
    entries = []
    for key_name, names in checked_tie_groups(replicas, labels):
        tensors = [r[key_name].detach() for r in replicas]  # parameters: no autograd graph
        check_aligned(key_name, tensors, labels)
        method = plan.method_for(key_name)
        base_tensor = out = prepared = None
        if tensors[0].is_floating_point():
            base_tensor = plan.base_for(key_name, base, "base=<pre-trained state dict>")
            if base_tensor is not None:
                base_tensor = base_tensor.detach()
                check_aligned(key_name, [tensors[0], base_tensor], [labels[0], "base"])
            if exact_on(method, device):
                first = tensors[0]
                out = torch.empty(first.shape, dtype=first.dtype, device=device)
                prepared = plan.prepare(key_name, tensors, base_tensor, chunk_numel)
        flat = [t.reshape(-1) for t in tensors]
        flat_base = None if base_tensor is None else base_tensor.reshape(-1)
        entries.append(
            _Entry(key_name, names, tensors[0].shape, flat, flat_base, method, prepared, out)
        )
    return entries


def _chunks(entries: Sequence[_Entry], chunk_numel: int) -> Iterator[tuple[_Entry, int, int]]:
    for entry in entries:
        if entry.out is not None:
            numel = entry.out.numel()
            for begin in range(0, numel, chunk_numel):
                yield entry, begin, min(begin + chunk_numel, numel)


def merge_through_device(
    replicas: Sequence[Mapping[str, torch.Tensor]],
    labels: Sequence[str],
    indices: Sequence[int],
    plan: MergePlan,
    base: Mapping[str, torch.Tensor] | None,
    *,
    device: torch.device | str,
    chunk_numel: int = DEVICE_CHUNK_NUMEL,
    depth: int = 2,
) -> dict[str, torch.Tensor]:
    """The merge of :func:`~.state_dict.merge_state_dicts` (one attempt: no dropping), its
    tensors on ``device``; see the module docstring. ``depth`` staging sets (>= 2 overlaps).

    Example:
        >>> from lightning_selmerge.merging import WeightedAverage
        >>> plan = MergePlan.create(WeightedAverage(), (), seed=0, num_replicas=2)
        >>> replicas = [{"w": torch.zeros(5)}, {"w": torch.ones(5)}]
        >>> merge_through_device(replicas, ["replica 0", "replica 1"], [0, 1], plan, None,
        ...                      device="cpu", chunk_numel=2)["w"].tolist()
        [0.5, 0.5, 0.5, 0.5, 0.5]
    """
    device = torch.device(device)
    if depth < 1:
        raise ValueError(f"depth must be >= 1 staging sets, got {depth}")
    entries = _entries(replicas, labels, plan, base, device, chunk_numel)
    chunks = list(_chunks(entries, chunk_numel))
    nbytes = max(((e - b) * x.out.element_size() for x, b, e in chunks), default=0)
    inputs = len(replicas) + any(x.base is not None for x, _, _ in chunks)
    pipeline = StagingPipeline(device, depth=depth, inputs=inputs, nbytes=nbytes)
    staged = done = 0

    def stage_until(limit: int) -> int:
        count = staged
        while count < min(limit, len(chunks)):
            entry, begin, end = chunks[count]
            pieces = [f[begin:end] for f in entry.flat]
            if entry.base is not None:
                pieces.append(entry.base[begin:end])
            pipeline.stage(count % depth, pieces)
            count += 1
        return count

    merged: dict[str, torch.Tensor] = {}
    try:
        for entry in entries:
            if entry.out is None:  # merged on the CPU while the next chunk's copy runs
                staged = stage_until(done + depth - 1)
                merged[entry.key] = _on_cpu(entry, plan, labels, indices).to(device)
                continue
            for _ in range(-(-entry.out.numel() // chunk_numel)):
                staged = stage_until(done + depth)
                _, begin, end = chunks[done]
                views = pipeline.ready(done % depth)
                parts = views[: len(entry.flat)]
                base_part = views[-1] if entry.base is not None else None
                for _ in iter_merged_chunks(
                    entry.key,
                    parts,
                    base_part,
                    entry.method,
                    plan.rng,
                    chunk_numel=end - begin,
                    offset=begin,
                    check_finite_as=labels,
                    indices=indices,
                    out=entry.out.view(-1)[begin:end],
                    prepared=entry.prepared,
                ):
                    pass
                pipeline.release(done % depth)
                done += 1
            merged[entry.key] = entry.out
    finally:
        pipeline.close()
    result = {name: merged[entry.key] for entry in entries for name in entry.names}
    return {name: result[name] for name in replicas[0]}


def _on_cpu(
    entry: _Entry, plan: MergePlan, labels: Sequence[str], indices: Sequence[int]
) -> torch.Tensor:
    """A tensor the device does not merge: as :func:`~.state_dict.merge_state_dicts` does."""
    if not entry.flat[0].is_floating_point():
        return copy_exact(entry.key, entry.flat, labels).view(entry.shape)
    merged = merge_tensor(
        entry.key,
        entry.flat,
        entry.base,
        entry.method,
        plan.rng,
        chunk_numel=DEFAULT_CHUNK_NUMEL,
        check_finite_as=labels,
        indices=indices,
    )
    return merged.view(entry.shape)
