"""Merge replicas that live on different ranks, with collectives over the replica dimension.

Every rank of a ``group`` holds some of the K replicas, all cut to the same slice of each
tensor (the same FSDP shard, or the whole tensor), and the flat offset of that slice in the full
tensor. The result on every rank is the merge of its slice, bit-identical to
:func:`~lightning_selmerge.merging.merge_state_dicts` on the full replicas with the same seed:
the random draws are keyed by (seed, tensor name, element offset), so every rank draws the same
choice for an element whatever the number of ranks, shards or chunks.

* **Selection** costs one ``all_reduce(SUM)`` per chunk on the bytes of the values: each rank
  contributes the elements it was chosen for and zeros elsewhere, so every byte has at most one
  non-zero term and the sum is exact (also for ``-0.0`` and NaN payloads). Resample adds one
  small ``all_reduce`` of the per-element "moved" bit set (bit ``k`` for replica ``k``).
* **Average** (and every other method) gathers the K values of the chunk so that the sum runs in
  the single-process order: a plain ``all_reduce`` would add in another order and change the
  last bits. It moves K/2 times the bytes of an all-reduce, once per merge. The gathered chunk
  is merged by a fused kernel where one covers it (:mod:`.kernels`), else by the method's.
* Integer and bool tensors are gathered, checked equal and copied from replica 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .alignment import check_aligned, check_same_names, copy_exact
from .errors import MergeError
from .kernels.dispatch import floating_bytes, fused_merge_chunk, merge_size
from .keyed_random import KeyedRandom
from .methods import ChunkContext, MergeMethod, ParameterSelection, bit_view, moved_bits
from .plan import MergePlan, check_whole_tensor, checked_tie_groups, prepare_tensor, tie_groups
from .rules import MergeRule
from .scratch import scratch_scope
from .tensor_merge import DEFAULT_CHUNK_NUMEL

__all__ = ["merge_state_dicts_collective", "shard_offset"]


def shard_offset(full_shape: Sequence[int], num_shards: int, shard: int) -> int:
    """Flat offset of shard ``shard`` of ``torch.chunk(tensor, num_shards, dim=0)``.

    That is how FSDP2 (``fully_shard``) and ``DTensor`` ``Shard(0)`` cut a tensor.

    Example:
        >>> shard_offset((10, 3), num_shards=4, shard=2)  # rows 6..8
        18
    """
    if not full_shape:
        return 0
    rows = int(full_shape[0])
    per_shard = -(-rows // num_shards)
    row_numel = 1
    for size in full_shape[1:]:
        row_numel *= int(size)
    return min(shard * per_shard, rows) * row_numel


def merge_state_dicts_collective(
    local_replicas: Mapping[int, Mapping[str, torch.Tensor]],
    *,
    num_replicas: int,
    group: dist.ProcessGroup | None = None,
    offsets: Mapping[str, int] | None = None,
    method: MergeMethod | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    rules: Sequence[MergeRule] = (),
    seed: int = 0,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge K replicas spread over the ranks of ``group``; every rank gets its slice of the merge.

    Args:
        local_replicas: this rank's replicas, ``{replica index: state dict}``. Over the group the
            indices must cover ``0 .. num_replicas - 1`` once, with as many on every rank.
        num_replicas: K.
        group: the ranks holding the other replicas of the same slices (default: the world).
        offsets: flat offset of each local tensor in the full tensor (default 0: whole tensors);
            see :func:`shard_offset`.
        method, base, rules, seed, chunk_numel: as in
            :func:`~lightning_selmerge.merging.merge_state_dicts`; ``base`` is this rank's slice.
        device: where chunks are merged and communicated (e.g. the rank's GPU for NCCL); default:
            the tensors' device. The result stays on the tensors' device.

    Example (each of 2 ranks holds one replica)::

        merged = merge_state_dicts_collective(
            {rank: model.state_dict()}, num_replicas=2, method=ParameterSelection(), seed=0
        )
    """
    plan = MergePlan.create(method, rules, seed, num_replicas)
    indices = sorted(local_replicas)
    if not indices:
        raise MergeError("merge_state_dicts_collective: this rank holds no replica")
    states = [local_replicas[k] for k in indices]
    labels = [f"replica {k}" for k in indices]
    check_same_names([set(s) for s in states], labels)
    held = _check_layout(indices, states, num_replicas, group)
    offsets = offsets or {}

    merged: dict[str, torch.Tensor] = {}
    # what this rank merges: its slices of all K replicas
    replica_bytes = sum(floating_bytes(s.values()) for s in states) * num_replicas // len(states)
    with scratch_scope(), merge_size(replica_bytes):
        for key_name, names in checked_tie_groups(states, labels):  # one order on every rank
            tensors = [s[key_name].detach() for s in states]  # parameters: no autograd graph
            check_aligned(key_name, tensors, labels)
            chosen = plan.method_for(key_name)
            base_tensor = prepared = None
            if tensors[0].is_floating_point():
                hint = "base=<this rank's slice of the base>"
                base_tensor = plan.base_for(key_name, base, hint)
                if base_tensor is not None:
                    base_tensor = base_tensor.detach()
                    check_aligned(key_name, [tensors[0], base_tensor], ["replica", "base"])
                check_whole_tensor(plan, key_name, sharded=bool(offsets))
                prepared = _gather_prepared(
                    prepare_tensor(chosen, key_name, tensors, base_tensor, chunk_numel),
                    indices,
                    group,
                )
            result = _merge_tensor(
                key_name,
                dict(zip(indices, tensors)),
                base_tensor,
                chosen,
                plan.rng,
                num_replicas=num_replicas,
                held=held,
                group=group,
                offset=int(offsets.get(key_name, 0)),
                chunk_numel=chunk_numel,
                device=device,
                prepared=prepared,
            )
            for name in names:
                merged[name] = result
    return {name: merged[name] for name in states[0]}


def _gather_prepared(
    local: list | None, indices: list[int], group: dist.ProcessGroup | None
) -> list | None:
    """Every replica's :meth:`~MergeMethod.prepare_replica` result, in replica order."""
    if local is None:
        return None
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(zip(indices, local)), group=group)
    everyone = {k: value for part in gathered for k, value in part.items()}
    return [everyone[k] for k in sorted(everyone)]


def _check_layout(
    indices: list[int],
    states: Sequence[Mapping[str, torch.Tensor]],
    num_replicas: int,
    group: dist.ProcessGroup | None,
) -> list[list[int]]:
    """The replicas each rank holds, after checking they cover 0..K-1 once, as many per rank,
    and that every rank holds the same slices of the same tensors, tied alike."""
    signature = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in sorted(states[0].items()))
    tied = sorted(names for _, names in tie_groups(states[0]) if len(names) > 1)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (indices, signature, tied), group=group)
    held = [list(ks) for ks, _, _ in gathered]
    everything = sorted(k for ks in held for k in ks)
    if everything != list(range(num_replicas)) or len({len(ks) for ks in held}) != 1:
        raise MergeError(
            f"the ranks hold replicas {held}: each of the K={num_replicas} replicas must be on "
            "exactly one rank of the group, the same number on every rank"
        )
    ours = {n: (s, d) for n, s, d in signature}
    for rank, (_, theirs_signature, theirs_tied) in enumerate(gathered):
        if sorted(map(sorted, theirs_tied)) != sorted(map(sorted, tied)):
            raise MergeError(
                f"rank {rank} of the merge group ties its tensors unlike this rank ({theirs_tied} "
                f"vs {tied}): every rank must hold replicas of one model, tied alike"
            )
        if theirs_signature != signature:
            theirs = {n: (s, d) for n, s, d in theirs_signature}
            diff = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
            raise MergeError(
                f"rank {rank} of the merge group holds other tensors than this rank (first "
                f"differences: {diff[:5]}): every rank must hold the same slice of every tensor"
            )
    return held


def _merge_tensor(
    name: str,
    local: dict[int, torch.Tensor],
    base: torch.Tensor | None,
    method: MergeMethod,
    rng: KeyedRandom,
    *,
    num_replicas: int,
    held: list[list[int]],
    group: dist.ProcessGroup | None,
    offset: int,
    chunk_numel: int,
    device: torch.device | str | None,
    prepared: list | None = None,
) -> torch.Tensor:
    first = next(iter(local.values()))
    work = torch.device(device) if device is not None else first.device
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    flat_out = out.view(-1)
    flat = {k: t.reshape(-1) for k, t in local.items()}
    flat_base = base.reshape(-1) if base is not None else None
    select = first.is_floating_point() and isinstance(method, ParameterSelection)
    for begin in range(0, first.numel(), chunk_numel):
        end = min(begin + chunk_numel, first.numel())
        chunks = {k: t[begin:end].to(work) for k, t in flat.items()}
        base_chunk = None if flat_base is None else flat_base[begin:end].to(work)
        ctx = ChunkContext(rng, name, offset + begin, prepared)
        if select:
            result = _select_chunk(ctx, chunks, base_chunk, method, num_replicas, group)
        else:
            everyone = _gather_chunks(chunks, held, group)
            if first.is_floating_point():
                result = torch.empty_like(everyone[0])
                if fused_merge_chunk(method, ctx, everyone, base_chunk, result) is None:
                    result = method.merge_chunk(ctx, everyone, base_chunk)
            else:
                result = copy_exact(name, everyone, [f"replica {k}" for k in range(len(everyone))])
        flat_out[begin:end].copy_(result)
    return out


def _select_chunk(
    ctx: ChunkContext,
    chunks: dict[int, torch.Tensor],
    base: torch.Tensor | None,
    method: ParameterSelection,
    num_replicas: int,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Every rank draws the same choice; one byte-wise SUM assembles the chosen values."""
    first = next(iter(chunks.values()))
    numel, device = first.numel(), first.device
    moved = None
    if method.resample > 0:
        local_bits = {k: bit_view(chunk) for k, chunk in chunks.items()}
        moved = moved_bits(local_bits, bit_view(base), dtype=_mask_dtype(num_replicas))
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)  # disjoint bits: SUM is OR
    choice = method.choose(ctx, numel, num_replicas, moved, device)
    contribution = torch.zeros_like(bit_view(first))
    for k, chunk in chunks.items():
        contribution = torch.where(choice == k, bit_view(chunk), contribution)
    dist.all_reduce(contribution.view(torch.uint8), op=dist.ReduceOp.SUM, group=group)
    return contribution.view(first.dtype)


def _gather_chunks(
    chunks: dict[int, torch.Tensor], held: list[list[int]], group: dist.ProcessGroup | None
) -> list[torch.Tensor]:
    """The K replicas' chunks on every rank, in replica order (``held``: replicas per rank)."""
    indices = sorted(chunks)
    stacked = torch.stack([chunks[k] for k in indices])
    bytes_ = stacked.view(torch.uint8) if stacked.dtype == torch.bool else stacked
    world = dist.get_world_size(group)
    rows_per_rank = bytes_.shape[0]
    gathered = bytes_.new_empty((world * rows_per_rank, *bytes_.shape[1:]))
    _all_gather_single(gathered, bytes_.contiguous(), group=group)
    gathered = gathered.view(world, *bytes_.shape)
    rows = {k: gathered[rank, j] for rank, ks in enumerate(held) for j, k in enumerate(ks)}
    values = [rows[k] for k in range(len(rows))]
    return [v.view(torch.bool) for v in values] if stacked.dtype == torch.bool else values


#: ``all_gather_into_tensor`` was renamed in torch 2.10
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _mask_dtype(num_replicas: int) -> torch.dtype:
    """A dtype for K bits that gloo and NCCL can sum (NCCL has no int16)."""
    if num_replicas <= 8:
        return torch.uint8
    return torch.int32 if num_replicas <= 31 else torch.int64
