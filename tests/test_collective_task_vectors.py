"""Task arithmetic, TIES and DARE merged over gloo ranks equal the single-process merge."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from collective_worker import full_replicas, slice_of

from lightning_selmerge.merging import Dare, MergeError, TaskArithmetic, TiesMerging
from lightning_selmerge.merging.collective import merge_state_dicts_collective, shard_offset
from lightning_selmerge.merging.state_dict import merge_state_dicts

METHODS = [
    TaskArithmetic(weights=[1.0, -0.5, 2.0, 1.0], scale=0.5),
    TaskArithmetic(combine="selection"),
    TiesMerging(density=0.4),
    TiesMerging(density=0.4, combine="selection"),
    Dare(drop_rate=0.3),
    Dare(combine="selection"),
]


def run(rank: int, world: int, init_file: str, shards: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        groups = world // shards
        group_index, shard = divmod(rank, shards)
        replica_groups = [dist.new_group(list(range(s, world, shards))) for s in range(shards)]
        replicas, base = full_replicas(4)
        del base["steps"]
        for r in replicas:
            del r["steps"]
        per_group = 4 // groups
        mine = range(group_index * per_group, (group_index + 1) * per_group)
        local = {k: slice_of(replicas[k], shards, shard) for k in mine}
        offsets = {n: shard_offset(t.shape, shards, shard) for n, t in base.items()}
        for method in METHODS:
            kwargs = {"num_replicas": 4, "group": replica_groups[shard], "method": method}
            kwargs |= {"base": slice_of(base, shards, shard), "seed": 3, "chunk_numel": 7}
            if shards > 1 and method.needs_whole_tensor:
                try:
                    merge_state_dicts_collective(local, offsets=offsets, **kwargs)
                except MergeError as err:
                    assert "needs the whole tensor" in str(err)
                    continue
                raise AssertionError(f"{method} merged shards without the whole tensor")
            got = merge_state_dicts_collective(
                local, offsets=offsets if shards > 1 else None, **kwargs
            )
            want = slice_of(
                merge_state_dicts(replicas, method=method, base=base, seed=3), shards, shard
            )
            for name in want:
                assert torch.equal(got[name].reshape(-1), want[name].reshape(-1)), (method, name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "shards"), [(2, 1), (2, 2)])
def test_task_vector_methods_over_ranks_equal_the_single_process_merge(tmp_path, world, shards):
    mp.start_processes(
        run, args=(world, str(tmp_path / "init"), shards), nprocs=world, start_method="spawn"
    )
