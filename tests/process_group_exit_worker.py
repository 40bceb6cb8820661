"""One gloo rank for tests/test_process_groups.py: ``python process_group_exit_worker.py INIT
RANK WORLD``. Builds the strategy's ("replica", "shard") mesh, runs a collective on each group
and keeps the mesh alive (as a live trainer's strategy does), then checks that
``release_process_groups`` frees every group all the same (so their gloo worker threads are
joined); before that, an exit on an uncaught exception leaves them alone. Prints ``released``."""

from __future__ import annotations

import os
import sys
import weakref

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.distributed_c10d import _world

from lightning_selmerge.ensemble import process_groups


def gloo_worker_threads() -> int:
    """Live gloo worker threads of this process (Linux names them ``pt_gloo_runloop``)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return names.count("pt_gloo_runloop")


def main() -> None:
    init, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replica", "shard"))
    process_groups.release_at_exit(mesh)
    for group in (None, mesh["replica"].get_group(), mesh["shard"].get_group()):
        total = torch.ones(3)
        dist.all_reduce(total, group=group)
    groups = [weakref.ref(group) for group in _world.pg_map]
    threads = gloo_worker_threads()
    assert threads > 0, "no gloo worker threads to join"
    del group  # the mesh stays referenced to the end

    sys.last_value = RuntimeError("an uncaught error")  # what Python sets before exiting on it
    process_groups.release_process_groups()
    assert dist.is_initialized(), "groups torn down on an error exit"
    assert gloo_worker_threads() == threads
    del sys.last_value

    process_groups.release_process_groups()
    assert not dist.is_initialized()
    alive = [ref for ref in groups if ref() is not None]
    assert not alive, f"{len(alive)} of {len(groups)} process groups outlived the release"
    assert gloo_worker_threads() == 0, f"{gloo_worker_threads()} gloo threads not joined"
    print("released", tuple(mesh.mesh.shape))  # the mesh object was alive all along


if __name__ == "__main__":
    main()
