"""Time of the collective merge (replicas on different ranks) against the one-process merge.

K synthetic bf16 replicas (``--total-mb`` of them in all; each the base plus noise, with half of
the elements left at the base so resample has work) are spread over ``--world`` ranks of one
gloo group (on CUDA machines ``--backend nccl`` puts rank r on GPU r). Each rank times
``merge_state_dicts_collective`` for selection, selection + resample(4) and average over its
``K / world`` replicas; rank 0 also times ``merge_state_dicts`` on all K replicas in one process
and checks that every collective result is bit-identical to it. Printed: seconds (best of
``--repeats``), and the collective / one-process ratio. The collective moves, per chunk, one
byte-wise all-reduce of the values (selection), plus one of the per-element moved bit set
(resample), or an all-gather of the K values (average).

Run from the repository root::

    python benchmarks/collective_merge_bench.py --world 2 --total-mb 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_selmerge.merging import (
    ParameterSelection,
    WeightedAverage,
    merge_state_dicts,
)
from lightning_selmerge.merging.collective import merge_state_dicts_collective

METHODS = {
    "selection": ParameterSelection(),
    "selection+resample(4)": ParameterSelection(resample=4),
    "average": WeightedAverage(),
}


def replicas(k: int, total_mb: int) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """K bf16 state dicts of 8 square matrices each, ``total_mb`` MB in all, and their base."""
    numel = total_mb * 2**20 // (2 * k * 8)
    side = int(numel**0.5)
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(side, side, generator=gen).bfloat16() for i in range(8)}
    out = []
    for _ in range(k):
        state = {}
        for name, tensor in base.items():
            noise = (torch.randn(tensor.shape, generator=gen) * 0.01).bfloat16()
            keep = torch.rand(tensor.shape, generator=gen) < 0.5
            state[name] = torch.where(keep, tensor, tensor + noise)
        out.append(state)
    return out, base


def best_of(repeats: int, fn, sync: bool = True) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    best, result = float("inf"), {}
    for _ in range(repeats):
        if sync:
            dist.barrier()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def worker(rank: int, args: argparse.Namespace, init: str) -> None:
    device = torch.device("cuda", rank) if args.backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    dist.init_process_group(
        args.backend, init_method=f"file://{init}", rank=rank, world_size=args.world
    )
    all_replicas, base = replicas(args.replicas, args.total_mb)
    per_rank = args.replicas // args.world
    mine = {k: all_replicas[k] for k in range(rank * per_rank, (rank + 1) * per_rank)}
    rows = []
    for label, method in METHODS.items():
        seconds, merged = best_of(
            args.repeats,
            lambda m=method: merge_state_dicts_collective(
                mine, num_replicas=args.replicas, method=m, base=base, seed=0, device=device
            ),
        )
        if rank == 0:
            single_s, single = best_of(
                args.repeats,
                lambda m=method: merge_state_dicts(all_replicas, method=m, base=base, seed=0),
                sync=False,  # rank 0 alone
            )
            same = all(torch.equal(merged[n], single[n]) for n in single)
            rows.append((label, seconds, single_s, same))
    if rank == 0:
        print(
            f"K={args.replicas} bf16 replicas, {args.total_mb} MB in all, {args.world} ranks "
            f"({args.backend}), {torch.get_num_threads()} threads per rank"
        )
        print(f"{'method':24s} {'collective s':>12s} {'1-process s':>12s} {'ratio':>6s}  bits")
        for label, seconds, single_s, same in rows:
            print(
                f"{label:24s} {seconds:12.3f} {single_s:12.3f} {seconds / single_s:6.2f}  "
                f"{'identical' if same else 'DIFFERENT'}"
            )
        if not all(row[3] for row in rows):
            raise SystemExit("collective and one-process merges differ")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--total-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    args = parser.parse_args()
    if args.replicas % args.world:
        parser.error("--replicas must be a multiple of --world")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            worker, args=(args, f"{tmp}/init"), nprocs=args.world, start_method="spawn"
        )


if __name__ == "__main__":
    main()
