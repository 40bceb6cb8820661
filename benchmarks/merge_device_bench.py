"""Speed of the in-memory merge (``merge_state_dicts``) on one device, and its bits across devices.

What it measures:

* Builds K synthetic bf16 replicas (default 4, ``--total-gb`` of replicas in all) and their base
  on ``--device``, shaped like a small decoder (the tensor list of ``merge_bench.py``), with
  ``--unchanged`` of each replica's elements left equal to the base.
* Times ``merge_state_dicts`` for the weighted average, selection and selection + resample(4),
  for each ``--chunk-numel``, best of ``--repeats`` (CUDA: synchronized before and after).
* With ``--check-cpu``, merges every method on the CPU too (one chunk size) and checks that each
  output is bit-identical to the device's: the random draws are keyed by (seed, name, offset), and
  the average's float32 arithmetic is the same sequence of IEEE operations on both.

Examples (from the repository root)::

    python benchmarks/merge_device_bench.py --device cuda --check-cpu
    python benchmarks/merge_device_bench.py --device cpu --total-gb 0.2 --chunk-numel 1048576
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lightning_selmerge.merging import (  # noqa: E402
    ParameterSelection,
    WeightedAverage,
    merge_state_dicts,
)


def _merge_bench_module():
    spec = importlib.util.spec_from_file_location(
        "merge_bench", Path(__file__).with_name("merge_bench.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_replicas(
    total_gb: float, k: int, unchanged: float, device: torch.device, seed: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    shape = _merge_bench_module().choose_shape(total_gb, k, None, None)
    gen = torch.Generator(device=device).manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    replicas: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for name, dims in shape.tensors():
        base[name] = torch.randn(dims, generator=gen, device=device).to(torch.bfloat16)
        for replica in replicas:
            noise = torch.randn(dims, generator=gen, device=device).mul_(0.01).to(torch.bfloat16)
            keep = torch.rand(dims, generator=gen, device=device) < unchanged
            replica[name] = torch.where(keep, base[name], base[name] + noise)
    return replicas, base


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


METHODS = {
    "average": WeightedAverage(),
    "selection": ParameterSelection(),
    "selection+resample(4)": ParameterSelection(resample=4),
}


def time_merge(replicas, base, method, chunk_numel: int, repeats: int, device) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        merged = merge_state_dicts(
            replicas,
            base=base if method.needs_base else None,
            method=method,
            seed=0,
            chunk_numel=chunk_numel,
        )
        synchronize(device)
        best = min(best, time.perf_counter() - began)
        del merged
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--total-gb", type=float, default=1.5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--unchanged", type=float, default=0.3)
    parser.add_argument(
        "--chunk-numel", default="1048576,16777216,67108864", help="comma-separated sizes"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-cpu", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    chunks = [int(c) for c in args.chunk_numel.split(",")]

    replicas, base = make_replicas(args.total_gb, args.k, args.unchanged, device, seed=0)
    numel = sum(t.numel() for t in base.values())
    replica_gb = numel * 2 * args.k / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"K={args.k} bf16 replicas, {replica_gb:.3f} GB in all, {len(base)} tensors")

    results: dict[str, dict[str, float]] = {}
    for method_name, method in METHODS.items():
        time_merge(replicas, base, method, chunks[0], 1, device)  # warm-up (kernels, scratch)
        results[method_name] = {
            str(c): time_merge(replicas, base, method, c, args.repeats, device) for c in chunks
        }
    print(f"\n{'method':24s}" + "".join(f"{'chunk ' + str(c):>18s}" for c in chunks))
    for method_name, row in results.items():
        print(f"{method_name:24s}" + "".join(f"{row[str(c)]:>16.4f} s" for c in chunks))
    for c in chunks:
        avg = results["average"][str(c)]
        print(
            f"chunk {c}: selection / average {results['selection'][str(c)] / avg:.2f}, "
            f"resample(4) / average {results['selection+resample(4)'][str(c)] / avg:.2f}, "
            f"average {replica_gb / avg:.1f} GB/s of replicas"
        )

    identical: dict[str, bool] = {}
    if args.check_cpu and device.type != "cpu":
        cpu_replicas = [{n: t.cpu() for n, t in r.items()} for r in replicas]
        cpu_base = {n: t.cpu() for n, t in base.items()}
        for method_name, method in METHODS.items():
            kwargs = {"base": cpu_base if method.needs_base else None, "method": method, "seed": 0}
            on_cpu = merge_state_dicts(cpu_replicas, **kwargs)
            kwargs["base"] = base if method.needs_base else None
            on_device = merge_state_dicts(replicas, chunk_numel=chunks[-1], **kwargs)
            identical[method_name] = all(
                torch.equal(on_cpu[n].view(torch.int16), on_device[n].cpu().view(torch.int16))
                for n in on_cpu
            )
            print(f"{method_name}: {device} output bit-identical to CPU: {identical[method_name]}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "replica_gb": replica_gb,
                    "seconds": results,
                    "bit_identical_to_cpu": identical,
                },
                indent=1,
            )
        )
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
