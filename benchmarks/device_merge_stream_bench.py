"""The in-training merge on a GPU: CPU merge vs the replicas streamed through the GPU.

What it measures (without CUDA, the CPU rows only):

* Builds K (default 4) float32 replicas and their base in host memory, pinned as
  ``DataOrderEnsemble(pin_memory=True)`` keeps them (``--pageable``: not pinned), shaped like a
  GPT-2-style decoder (``--layers`` x ``--hidden``, ``--vocab``; the defaults give 0.37 B
  parameters in ~300 tensors, tied embedding), ``--unchanged`` of each replica's elements equal
  to the base.
* Times the ensemble's merge, ``replica_merge.merge_in_memory``, as the callback runs it: on the
  CPU (``device=None``, today's path when the module is on the CPU) and streamed through the GPU
  (``device=cuda``: chunks copied host-to-device on a side stream, overlapped with the merge),
  for each method; the GPU time includes the synchronisation at the end (best of
  ``--repeats``; the CPU merge ``--cpu-repeats`` times). GB/s counts the K replicas' bytes.
  The CPU merge runs on the torch kernels and, where numba is installed, on the fused kernels
  (``SELMERGE_KERNELS=torch`` / ``fused``): the CPU-only machine's before and after.
* Checks that every merged tensor (GPU, fused CPU) is bit-identical to the torch CPU kernels'.
* The copy floor: host-to-device copy of the K replicas alone (same chunks, one stream).

Example (from the repository root)::

    python benchmarks/device_merge_stream_bench.py                    # ~0.37 B params, K = 4
    python benchmarks/device_merge_stream_bench.py --layers 2 --json out.json
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

from lightning_selmerge.ensemble.replica_merge import merge_in_memory  # noqa: E402
from lightning_selmerge.merging import ParameterSelection, WeightedAverage  # noqa: E402
from lightning_selmerge.merging.device_stream import DEVICE_CHUNK_NUMEL  # noqa: E402
from lightning_selmerge.merging.kernels import use_kernels  # noqa: E402

METHODS = {
    "selection": ParameterSelection(),
    "selection+resample(1)": ParameterSelection(resample=1),
    "average": WeightedAverage(),
}
TARGET_GBPS = 10.0


def shapes(layers: int, hidden: int, vocab: int, positions: int) -> dict[str, tuple[int, ...]]:
    """A GPT-2-style decoder's tensors (the LM head is tied to ``wte``, added by the caller)."""
    out: dict[str, tuple[int, ...]] = {
        "wte.weight": (vocab, hidden),
        "wpe.weight": (positions, hidden),
    }
    for i in range(layers):
        p = f"h.{i}."
        out |= {
            p + "ln_1.weight": (hidden,),
            p + "ln_1.bias": (hidden,),
            p + "attn.c_attn.weight": (3 * hidden, hidden),
            p + "attn.c_attn.bias": (3 * hidden,),
            p + "attn.c_proj.weight": (hidden, hidden),
            p + "attn.c_proj.bias": (hidden,),
            p + "ln_2.weight": (hidden,),
            p + "ln_2.bias": (hidden,),
            p + "mlp.c_fc.weight": (4 * hidden, hidden),
            p + "mlp.c_fc.bias": (4 * hidden,),
            p + "mlp.c_proj.weight": (hidden, 4 * hidden),
            p + "mlp.c_proj.bias": (hidden,),
        }
    out |= {"ln_f.weight": (hidden,), "ln_f.bias": (hidden,)}
    return out


def make_states(args, device: torch.device):
    """K replicas and the base in host memory (pinned unless ``--pageable`` or there is no GPU),
    made on ``device``."""
    gen = torch.Generator(device=device).manual_seed(0)
    pin = not args.pageable and device.type == "cuda"

    def host(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin).copy_(tensor)

    base: dict[str, torch.Tensor] = {}
    replicas: list[dict[str, torch.Tensor]] = [{} for _ in range(args.k)]
    for name, dims in shapes(args.layers, args.hidden, args.vocab, args.positions).items():
        start = torch.randn(dims, generator=gen, device=device)
        base[name] = host(start)
        for replica in replicas:
            noise = torch.randn(dims, generator=gen, device=device).mul_(0.01)
            keep = torch.rand(dims, generator=gen, device=device) < args.unchanged
            replica[name] = host(torch.where(keep, start, start + noise))
    for state in (base, *replicas):
        state["lm_head.weight"] = state["wte.weight"]  # tied, as in GPT-2
    return replicas, base


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, dict[str, torch.Tensor]]:
    best, result = float("inf"), {}
    for _ in range(repeats):
        result = {}
        _sync()
        began = time.perf_counter()
        result = fn()
        _sync()
        best = min(best, time.perf_counter() - began)
    return best, result


def copy_floor(replicas, device: torch.device, chunk: int) -> float:
    """Seconds to copy the K replicas' tensors host-to-device in ``chunk``-element pieces."""
    staging = torch.empty(chunk, device=device)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for replica in replicas:
        for name, tensor in replica.items():
            if name == "lm_head.weight":
                continue
            flat = tensor.view(-1)
            for lo in range(0, flat.numel(), chunk):
                piece = flat[lo : lo + chunk]
                staging[: piece.numel()].copy_(piece, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - began


def same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names whose bits differ (or that are missing)."""
    bad = []
    for name, tensor in want.items():
        other = got.get(name)
        if other is None or other.shape != tensor.shape or other.dtype != tensor.dtype:
            bad.append(name)
            continue
        a = other.detach().cpu().reshape(-1).view(torch.uint8)
        if not torch.equal(a, tensor.reshape(-1).view(torch.uint8)):
            bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--unchanged", type=float, default=0.3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-repeats", type=int, default=1)
    parser.add_argument("--pageable", action="store_true", help="replicas not pinned")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    fused = importlib.util.find_spec("numba") is not None
    replicas, base = make_states(args, device)
    numel = sum(t.numel() for n, t in base.items() if n != "lm_head.weight")
    replica_gb = numel * 4 * args.k / 1e9
    where = torch.cuda.get_device_name(device) if gpu else "no CUDA GPU (CPU rows only)"
    print(
        f"{where}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
        f"fused CPU kernels {'yes' if fused else 'no (pip install numba)'}"
    )
    print(
        f"K={args.k} float32 replicas of {numel / 1e9:.3f} B params ({len(base)} tensors), "
        f"{replica_gb:.2f} GB of replicas, {'pinned' if gpu and not args.pageable else 'pageable'}"
        f", device chunk {DEVICE_CHUNK_NUMEL}"
    )
    floor = copy_floor(replicas, device, DEVICE_CHUNK_NUMEL) if gpu else None
    if floor:
        print(
            f"copy floor (host to device, one stream): {floor:.3f} s, {replica_gb / floor:.1f} GB/s"
        )

    results: dict[str, dict[str, float | bool]] = {}
    failed = False
    for name in args.methods.split(","):
        method = METHODS[name]

        def merge(on: torch.device | None, kernels: str, method=method):
            with use_kernels(kernels):
                return merge_in_memory(replicas, base, {}, method, (), 0, "error", on)

        row: dict[str, float | bool] = {}
        cpu_s, want = timed(lambda: merge(None, "torch"), args.cpu_repeats)
        row |= {"cpu_torch_s": cpu_s, "cpu_torch_gbps": replica_gb / cpu_s}
        line = f"{name:24s} CPU torch {cpu_s:7.3f} s ({replica_gb / cpu_s:6.2f} GB/s)"
        checks = []
        if fused:
            timed(lambda: merge(None, "fused"), 1)  # warm-up: loads the kernels
            fused_s, got = timed(lambda: merge(None, "fused"), args.cpu_repeats)
            checks.append(("fused CPU", same_bits(got, want)))
            row |= {"cpu_fused_s": fused_s, "cpu_fused_gbps": replica_gb / fused_s}
            rate = replica_gb / fused_s
            line += f"   CPU fused {fused_s:7.3f} s ({rate:6.2f} GB/s) x{cpu_s / fused_s:4.1f}"
            del got
        if gpu:
            timed(lambda: merge(device, "auto"), 1)  # warm-up: kernels, allocator
            gpu_s, got = timed(lambda: merge(device, "auto"), args.repeats)
            checks.append(("GPU stream", same_bits(got, want)))
            row |= {"gpu_stream_s": gpu_s, "gpu_stream_gbps": replica_gb / gpu_s}
            line += (
                f"   GPU stream {gpu_s:7.3f} s ({replica_gb / gpu_s:6.2f} GB/s) "
                f"x{cpu_s / gpu_s:5.1f}, target {TARGET_GBPS:.0f} GB/s "
                f"{'met' if replica_gb / gpu_s >= TARGET_GBPS else 'NOT met'}"
            )
            del got
        for label, bad in checks:
            failed |= bool(bad)
            row[f"{label} bit_identical"] = not bad
            line += f"   {label} " + (
                "bit-identical" if not bad else f"DIFFERS in {len(bad)} tensors: {bad[:3]}"
            )
        results[name] = row
        print(line)
    if args.json:
        info = {
            "device": where,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "replica_gb": replica_gb,
            "pinned": gpu and not args.pageable,
            "copy_floor_gbps": replica_gb / floor if floor else None,
            "results": results,
        }
        args.json.write_text(json.dumps(info, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
