"""Peak host memory against the number of replicas K: the merge side (issue 18, item 5 b).

``merge_memory`` writes K synthetic replica checkpoints of one small model (``--params``
float32 parameters, a few tens of MB per replica, shaped like a small transformer: an embedding
and per-layer matrices) plus their base, then merges the first K of them for each K of
``--k`` in a fresh subprocess per run, and samples that child's resident set (RSS) with psutil
every few milliseconds (its ``ru_maxrss`` from ``os.wait4`` is reported too: it catches peaks
between samples). The merges:

* ``streaming``: :func:`~lightning_selmerge.merging.streaming_files.merge_checkpoints_streaming`
  (one replica open at a time), the path ``lightning-selmerge merge`` takes;
* ``all-at-once``: :func:`~lightning_selmerge.merging.merge_checkpoints` (every replica mapped).

For each merge it prints peak RSS per K and the least-squares slope in bytes per added replica,
per parameter, and as a fraction of the model's bytes (goal for the streaming merge: <= 0.1).
The method is selection with resample 1 (the largest merge state: output, base copy, two
candidate bytes and a position byte per element) unless ``--method`` says otherwise.

Run from the repository root (about a minute on 2 cores)::

    python benchmarks/scale_memory_merge.py
    python benchmarks/scale_memory_merge.py --k 2 4 8 16 --params 10_000_000 --json /tmp/scale.json

``benchmarks/scale_memory.py`` runs this and the training side together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MERGES = ("streaming", "all-at-once")


def _layout(params: int, hidden: int = 256) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a small transformer-like model with about ``params`` parameters."""
    vocab = 8192
    per_layer = 12 * hidden * hidden + 2 * hidden
    layers = max(1, (params - vocab * hidden) // per_layer)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, hidden)}
    for i in range(layers):
        shapes[f"layers.{i}.attn.qkv.weight"] = (3 * hidden, hidden)
        shapes[f"layers.{i}.attn.out.weight"] = (hidden, hidden)
        shapes[f"layers.{i}.mlp.up.weight"] = (4 * hidden, hidden)
        shapes[f"layers.{i}.mlp.down.weight"] = (hidden, 4 * hidden)
        shapes[f"layers.{i}.norm1.weight"] = (hidden,)
        shapes[f"layers.{i}.norm2.weight"] = (hidden,)
    shapes["norm.weight"] = (hidden,)
    return shapes


def _write_inputs(directory: Path, k: int, params: int, seed: int) -> tuple[int, int]:
    """Base + K replicas (``replica_000.safetensors``...); returns (parameters, bytes) per model."""
    import torch
    from safetensors.torch import save_file

    shapes = _layout(params)
    gen = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    save_file(base, directory / "base.safetensors")
    for r in range(k):
        replica = {}
        for name, tensor in base.items():
            moved = torch.rand(tensor.shape, generator=gen) < 0.7
            replica[name] = torch.where(moved, tensor + 0.01 * torch.randn_like(tensor), tensor)
        save_file(replica, directory / f"replica_{r:03d}.safetensors")
        del replica
    numel = sum(t.numel() for t in base.values())
    return numel, numel * 4


def _child(spec: dict[str, Any]) -> None:
    from lightning_selmerge.merging import make_method, merge_checkpoints
    from lightning_selmerge.merging.streaming_files import merge_checkpoints_streaming

    method = make_method(spec["method"], resample=spec["resample"])
    merge = merge_checkpoints_streaming if spec["merge"] == "streaming" else merge_checkpoints
    print("ready", flush=True)
    sys.stdin.readline()  # the parent has recorded the start-up RSS
    merge(
        spec["replicas"],
        spec["out"],
        method=method,
        base=spec["base"] if method.needs_base else None,
        overwrite=True,
    )


def _run_child(spec: dict[str, Any], interval: float = 0.002) -> dict[str, int]:
    """Run one merge in a subprocess; peak RSS sampled with psutil, start-up RSS, ru_maxrss."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.wait()
        raise RuntimeError(f"merge child failed to start: {cmd}")
    watched = psutil.Process(proc.pid)
    startup = watched.memory_info().rss
    proc.stdin.write("go\n")
    proc.stdin.flush()
    peak = startup
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps it with its rusage
        if pid != 0:
            break
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, watched.memory_info().rss)
        time.sleep(interval)
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"merge child exited with {code}: {cmd}")
    maxrss = usage.ru_maxrss * 1024
    return {"startup_rss": startup, "peak_rss": peak, "ru_maxrss": maxrss}


def _slope(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of ys against xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / den if den else 0.0


def merge_memory(
    k_values: list[int],
    *,
    params: int = 10_000_000,
    method: str = "selection",
    resample: int = 1,
    merges: tuple[str, ...] = MERGES,
    seed: int = 0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Peak RSS of merging K replicas for each K of ``k_values``, per merge, and the slopes.

    Returns ``{"params", "model_bytes", "merges": {merge: {"runs": {K: {...}}, "slope_bytes",
    "slope_bytes_per_param", "slope_over_model_bytes"}}}``; the slope is over the psutil peak.
    """
    own = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="scale_memory_")) if own else Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        numel, model_bytes = _write_inputs(directory, max(k_values), params, seed)
        result: dict[str, Any] = {"params": numel, "model_bytes": model_bytes, "merges": {}}
        for merge in merges:
            runs = {}
            for k in k_values:
                spec = {
                    "merge": merge,
                    "method": method,
                    "resample": resample,
                    "replicas": [str(directory / f"replica_{r:03d}.safetensors") for r in range(k)],
                    "base": str(directory / "base.safetensors"),
                    "out": str(directory / "out"),
                }
                runs[k] = _run_child(spec)
                shutil.rmtree(directory / "out", ignore_errors=True)
            slope = _slope(list(runs), [r["peak_rss"] for r in runs.values()])
            result["merges"][merge] = {
                "runs": runs,
                "slope_bytes": slope,
                "slope_bytes_per_param": slope / numel,
                "slope_over_model_bytes": slope / model_bytes,
            }
        return result
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


def merge_report(result: dict[str, Any]) -> str:
    mb = 2**20
    lines = [
        f"model: {result['params'] / 1e6:.1f} M float32 parameters, "
        f"{result['model_bytes'] / mb:.0f} MB per replica"
    ]
    for merge, data in result["merges"].items():
        lines.append(f"\n{merge}:")
        lines.append(f"  {'K':>3} {'start-up MB':>12} {'peak RSS MB':>12} {'ru_maxrss MB':>13}")
        for k, run in data["runs"].items():
            lines.append(
                f"  {k:>3} {run['startup_rss'] / mb:>12.0f} {run['peak_rss'] / mb:>12.0f} "
                f"{run['ru_maxrss'] / mb:>13.0f}"
            )
        lines.append(
            f"  slope: {data['slope_bytes'] / mb:.2f} MB per added replica = "
            f"{data['slope_bytes_per_param']:.3f} bytes per parameter per replica = "
            f"{data['slope_over_model_bytes']:.3f} x model bytes (goal <= 0.1 for streaming)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16], help="values of K")
    parser.add_argument("--params", type=int, default=10_000_000, help="parameters per model")
    parser.add_argument("--method", default="selection", choices=["selection", "average"])
    parser.add_argument("--resample", type=int, default=1, help="selection's resample")
    parser.add_argument("--merges", nargs="+", default=list(MERGES), choices=MERGES)
    parser.add_argument("--workdir", type=Path, help="keep the inputs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the numbers to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    result = merge_memory(
        args.k,
        params=args.params,
        method=args.method,
        resample=args.resample if args.method == "selection" else 0,
        merges=tuple(args.merges),
        workdir=args.workdir,
    )
    print(merge_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    streaming = result["merges"].get("streaming")
    return 0 if streaming is None or streaming["slope_over_model_bytes"] <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
