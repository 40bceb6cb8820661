"""Speed of the in-memory merge (``merge_state_dicts``) on one device, and its bits across devices.

What it measures:

* Builds K synthetic replicas (default 4, ``--total-gb`` of replicas in all, ``--dtype``
  bfloat16 by default) and their base on ``--device``, shaped like a small decoder (the tensor
  list of ``merge_bench.py``), with ``--unchanged`` of each replica's elements left equal to the
  base.
* Times ``merge_state_dicts`` for the weighted average, selection and selection + resample(4),
  for each ``--chunk-numel``, best of ``--repeats`` (CUDA: synchronized before and after).
* ``--kernels``: which merge kernels (``lightning_selmerge.merging.kernels.use_kernels``): ``auto``
  (the default: the fused ones where installed), ``torch``, ``fused`` (Triton on CUDA, numba on
  CPUs), or ``both``: each method timed with the torch kernels and the fused ones, the ratio
  torch / fused printed, and every fused output checked bit-identical to the torch kernels'.
* With ``--check-cpu``, merges every method on the CPU too (one chunk size) and checks that each
  output is bit-identical to the device's: the random draws are keyed by (seed, name, offset), and
  the average's float32 arithmetic is the same sequence of IEEE operations on both.

The exit status is 1 when a bit-identity check fails, 2 on a usage error (such as ``--device
cuda`` where CUDA is not available).

Examples (from the repository root)::

    python benchmarks/merge_device_bench.py --device cuda --kernels both --check-cpu
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
from lightning_selmerge.merging.kernels import use_kernels  # noqa: E402

#: The fused kernels' package per device type (see lightning_selmerge.merging.kernels.dispatch).
FUSED_PACKAGE = {"cuda": "triton", "cpu": "numba"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _merge_bench_module():
    spec = importlib.util.spec_from_file_location(
        "merge_bench", Path(__file__).with_name("merge_bench.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_replicas(
    total_gb: float,
    k: int,
    unchanged: float,
    device: torch.device,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    # the shape is sized for bf16: scale the budget so that the replicas hold total_gb in all
    scale = 2 / torch.empty(0, dtype=dtype).element_size()
    shape = _merge_bench_module().choose_shape(total_gb * scale, k, None, None)
    gen = torch.Generator(device=device).manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    replicas: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for name, dims in shape.tensors():
        base[name] = torch.randn(dims, generator=gen, device=device).to(dtype)
        for replica in replicas:
            noise = torch.randn(dims, generator=gen, device=device).mul_(0.01).to(dtype)
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


def merge(replicas, base, method, chunk_numel: int | None, kernels: str) -> dict:
    """``merge_state_dicts`` with ``kernels`` (``chunk_numel=None``: its default chunks)."""
    chunking = {} if chunk_numel is None else {"chunk_numel": chunk_numel}
    with use_kernels(kernels):
        return merge_state_dicts(
            replicas, base=base if method.needs_base else None, method=method, seed=0, **chunking
        )


def time_merge(replicas, base, method, chunk_numel: int, repeats: int, device, kernels) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        merged = merge(replicas, base, method, chunk_numel, kernels)
        synchronize(device)
        best = min(best, time.perf_counter() - began)
        del merged
    return best


def bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Every tensor of ``a`` has ``b``'s bits."""
    return a.keys() == b.keys() and all(
        torch.equal(a[n].view(torch.uint8).cpu(), b[n].view(torch.uint8).cpu()) for n in a
    )


def check_setup(parser: argparse.ArgumentParser, device: torch.device, kernels: str) -> None:
    """Stop with a usage error (exit status 2) naming what is missing, before building anything."""
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}): run on a GPU machine with a CUDA build of torch, or pass "
            "--device cpu"
        )
    package = FUSED_PACKAGE.get(device.type)
    if kernels in ("fused", "both") and (
        package is None or importlib.util.find_spec(package) is None
    ):
        needs = f"{package}, which is not installed: pip install {package}" if package else "none"
        parser.error(f"--kernels {kernels} on {device.type}: the fused kernels need {needs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--total-gb", type=float, default=1.5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--unchanged", type=float, default=0.3)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the replicas' dtype")
    parser.add_argument(
        "--chunk-numel", default="1048576,16777216,67108864", help="comma-separated sizes"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kernels",
        choices=("auto", "torch", "fused", "both"),
        default="auto",
        help="merge kernels to time; both: torch and fused, their ratio and a bit-identity check",
    )
    parser.add_argument("--check-cpu", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    chunks = [int(c) for c in args.chunk_numel.split(",")]
    check_setup(parser, device, args.kernels)
    settings = ["torch", "fused"] if args.kernels == "both" else [args.kernels]

    dtype = DTYPES[args.dtype]
    replicas, base = make_replicas(args.total_gb, args.k, args.unchanged, device, 0, dtype)
    numel = sum(t.numel() for t in base.values())
    replica_gb = numel * dtype.itemsize * args.k / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"K={args.k} {args.dtype} replicas, {replica_gb:.3f} GB in all, {len(base)} tensors")

    results: dict[str, dict[str, dict[str, float]]] = {}
    for setting in settings:
        timed = results[setting] = {}
        for method_name, method in METHODS.items():
            # warm-up: kernels (Triton compiles at first use), scratch buffers
            time_merge(replicas, base, method, chunks[0], 1, device, setting)
            timed[method_name] = {
                str(c): time_merge(replicas, base, method, c, args.repeats, device, setting)
                for c in chunks
            }
    for setting, timed in results.items():
        print(
            f"\nkernels {setting}\n{'method':24s}"
            + "".join(f"{'chunk ' + str(c):>18s}" for c in chunks)
        )
        for method_name, row in timed.items():
            print(f"{method_name:24s}" + "".join(f"{row[str(c)]:>16.4f} s" for c in chunks))
        for c in chunks:
            avg = timed["average"][str(c)]
            print(
                f"chunk {c}: selection / average {timed['selection'][str(c)] / avg:.2f}, "
                f"resample(4) / average {timed['selection+resample(4)'][str(c)] / avg:.2f}, "
                f"average {replica_gb / avg:.1f} GB/s of replicas"
            )
    speedups: dict[str, dict[str, float]] = {}
    fused_identical: dict[str, bool] = {}
    if args.kernels == "both":
        print("\ntorch / fused time (above 1: the fused kernels are faster)")
        for method_name, method in METHODS.items():
            speedups[method_name] = {
                str(c): results["torch"][method_name][str(c)]
                / results["fused"][method_name][str(c)]
                for c in chunks
            }
            ratios = ", ".join(f"chunk {c}: {r:.2f}" for c, r in speedups[method_name].items())
            # the same bits at the smallest and the largest chunk size (chunks split tensors)
            fused_identical[method_name] = all(
                bits_equal(
                    merge(replicas, base, method, c, "torch"),
                    merge(replicas, base, method, c, "fused"),
                )
                for c in sorted({chunks[0], chunks[-1]})
            )
            print(
                f"{method_name:24s} {ratios}; fused bit-identical to torch: "
                f"{fused_identical[method_name]}"
            )

    identical: dict[str, bool] = {}
    if args.check_cpu and device.type != "cpu":
        cpu_replicas = [{n: t.cpu() for n, t in r.items()} for r in replicas]
        cpu_base = {n: t.cpu() for n, t in base.items()}
        for method_name, method in METHODS.items():
            on_cpu = merge(cpu_replicas, cpu_base, method, None, "auto")
            on_device = merge(replicas, base, method, chunks[-1], settings[-1])
            identical[method_name] = bits_equal(on_cpu, on_device)
            print(f"{method_name}: {device} output bit-identical to CPU: {identical[method_name]}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "dtype": args.dtype,
                    "replica_gb": replica_gb,
                    "seconds": results,
                    "torch_over_fused": speedups,
                    "fused_bit_identical_to_torch": fused_identical,
                    "bit_identical_to_cpu": identical,
                },
                indent=1,
            )
        )
    return 0 if all(identical.values()) and all(fused_identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
