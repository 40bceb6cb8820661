"""Worker of tests/test_collective_merge.py: one rank of a gloo group (run through spawn)."""

from __future__ import annotations

import importlib.util
import itertools

import torch
import torch.distributed as dist

from lightning_selmerge.merging import MergeRule, ParameterSelection, WeightedAverage
from lightning_selmerge.merging.collective import merge_state_dicts_collective, shard_offset
from lightning_selmerge.merging.kernels import use_kernels
from lightning_selmerge.merging.scratch import held_buffer_bytes
from lightning_selmerge.merging.state_dict import merge_state_dicts

K = 4


def full_replicas(num_replicas: int) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Replicas that moved part of the base (so resample has work), tied and integer tensors."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "emb": torch.randn(13, 6, generator=gen),
        "norm": torch.randn(7, generator=gen),
        "half": torch.randn(9, 5, generator=gen).to(torch.bfloat16),
        "steps": torch.arange(5),
    }
    replicas = []
    for _ in range(num_replicas):
        state = {}
        for name, tensor in base.items():
            if tensor.is_floating_point():
                delta = torch.randn(tensor.shape, generator=gen).to(tensor.dtype)
                keep = torch.rand(tensor.shape, generator=gen) < 0.5
                tensor = torch.where(keep, tensor, tensor + delta)
                if name == "emb":
                    tensor[0, 0] = -0.0  # the byte-wise sum must keep the sign of zero
            state[name] = tensor.clone()
        state["head"] = state["emb"]  # tied
        replicas.append(state)
    base["head"] = base["emb"]
    return replicas, base


def slice_of(state: dict[str, torch.Tensor], shards: int, shard: int) -> dict[str, torch.Tensor]:
    memo: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if id(tensor) not in memo:
            chunks = torch.chunk(tensor, shards, dim=0) if tensor.dim() else [tensor]
            part = chunks[shard] if shard < len(chunks) else tensor[:0]
            memo[id(tensor)] = part.clone()
        out[name] = memo[id(tensor)]
    return out


def run(rank: int, world: int, init_file: str, groups: int, num_replicas: int) -> None:
    """``groups`` replica groups x ``world // groups`` shards; check every method."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shards = world // groups
        group_index, shard = divmod(rank, shards)
        # the replica-dimension group of this rank: the ranks holding the same shard
        replica_groups = [dist.new_group(list(range(s, world, shards))) for s in range(shards)]
        group = replica_groups[shard]
        per_group = num_replicas // groups
        mine = range(group_index * per_group, (group_index + 1) * per_group)
        replicas, base = full_replicas(num_replicas)
        local = {k: slice_of(replicas[k], shards, shard) for k in mine}
        local_base = slice_of(base, shards, shard)
        offsets = {name: shard_offset(t.shape, shards, shard) for name, t in base.items()}
        cases = [
            ParameterSelection(),
            ParameterSelection(resample=2),
            ParameterSelection(resample=9),  # the per-candidate-stream path
            ParameterSelection(probabilities=[0.1, 0.2, 0.3, 0.4][:num_replicas])
            if num_replicas == 4
            else ParameterSelection(probabilities=[1 / num_replicas] * num_replicas),
            WeightedAverage(),
            WeightedAverage(weights=[float(k + 1) for k in range(num_replicas)]),
        ]
        rules = [MergeRule("norm", WeightedAverage())]
        # auto: this merge is small, so the torch kernels; fused: the gathered chunks take the
        # fused kernels (the same bits)
        settings = ["auto", "fused"] if importlib.util.find_spec("numba") else ["auto"]
        for method, chunk, setting in itertools.product(cases, (5, 1 << 20), settings):
            with use_kernels(setting):
                got = merge_state_dicts_collective(
                    local,
                    num_replicas=num_replicas,
                    group=group,
                    offsets=offsets,
                    method=method,
                    base=local_base,
                    rules=rules,
                    seed=7,
                    chunk_numel=chunk,
                )
            assert held_buffer_bytes() == 0, "the merge's scratch is freed when it returns"
            want = slice_of(
                merge_state_dicts(replicas, method=method, base=base, rules=rules, seed=7),
                shards,
                shard,
            )
            for name in want:
                assert got[name].dtype == want[name].dtype, name
                assert torch.equal(
                    got[name].view(-1).view(torch.uint8),
                    want[name].reshape(-1).view(torch.uint8),
                ), (method, setting, name)
            assert got["head"] is got["emb"], "tied tensors stay tied"
    finally:
        dist.destroy_process_group()


def run_tied_unlike(rank: int, world: int, init_file: str) -> None:
    """Rank 0 holds a replica whose head is tied to its embedding, rank 1 one whose head is a
    copy: every rank refuses (each would read other names, and the collectives would pair
    other tensors)."""
    import pytest

    from lightning_selmerge.merging import MergeError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        replicas, _ = full_replicas(world)
        state = replicas[rank]
        if rank == 1:
            state["head"] = state["emb"].clone()
        with pytest.raises(MergeError, match="ties its tensors unlike this rank"):
            merge_state_dicts_collective({rank: state}, num_replicas=world, seed=0)
    finally:
        dist.destroy_process_group()
