"""Peak host memory of K replicas: one in-process ensemble fit versus replica jobs.

Training half (:func:`training_memory`), on one small GPT-2 built from a config (random tokens,
CPU, AdamW, 1 epoch of a few batches), for each K:

* ``ensemble``: one ``Trainer.fit`` with ``DataOrderEnsemble(num_replicas=K)`` and
  ``SelectionMergeCallback(method="selection", resample=1)``: the K replicas' weights and AdamW
  states live in host memory;
* ``job``: one replica job (``ReplicaJob(K, replica=0, ...)``, writing its snapshots): what each
  of the K jobs of a job array costs. It should not depend on K.

Each fit runs in a fresh interpreter; its peak RSS is the child's ``ru_maxrss`` (``os.wait4``;
this parent never imports torch), and psutil gives the child's RSS after imports and model
construction (the baseline). Prints both per K and the slope of peak RSS against K, in bytes per
model parameter per added replica (least squares over the K values).

Run from the repository root (about 4 minutes on 2 cores)::

    python benchmarks/scale_memory_training.py
    python benchmarks/scale_memory_training.py --k 2 4 8 16 --hidden 384 --json /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fit_support import quiet_trainer_kwargs, run_child, tiny_gpt2_fit_inputs


def _training_child(spec: dict[str, Any]) -> dict[str, float]:
    """Build the model and data, run one ensemble fit or one replica job, report sizes."""
    import psutil
    from lightning.pytorch import Trainer, seed_everything

    from lightning_selmerge.ensemble import DataOrderEnsemble, ReplicaJob, SelectionMergeCallback

    module, loader = tiny_gpt2_fit_inputs(spec)
    seed_everything(0, verbose=False)
    if spec["mode"] == "ensemble":
        kwargs: dict[str, Any] = {
            "strategy": DataOrderEnsemble(num_replicas=spec["k"], seed=0),
            "callbacks": [SelectionMergeCallback(resample=1, validate_replicas=False)],
        }
    else:
        job = ReplicaJob(spec["k"], 0, seed=0, snapshot_dir=spec["snapshot_dir"])
        kwargs = {"callbacks": [job]}
    trainer = Trainer(max_epochs=1, **quiet_trainer_kwargs(), **kwargs)
    baseline = psutil.Process().memory_info().rss
    trainer.fit(module, loader)
    params = sum(p.numel() for p in module.parameters())  # a tied tensor once
    return {"baseline_bytes": baseline, "params": params}


def _run_training_child(spec: dict[str, Any]) -> dict[str, float]:
    result, peak_bytes = run_child(__file__, "--training-child", spec)
    return {**result, "peak_bytes": peak_bytes}


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return num / sum((x - mean_x) ** 2 for x in xs)


def training_memory(
    k_values: list[int],
    hidden: int = 256,
    layers: int = 4,
    vocab: int = 2048,
    seq_len: int = 32,
    samples: int = 32,
    batch_size: int = 16,
    threads: int = 2,
) -> dict[str, Any]:
    """Peak RSS of one ensemble fit and of one replica job for each K, and the slopes in bytes
    per parameter per added replica (``{"rows": [...], "slopes": {...}, "params": P}``)."""
    spec = {
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab,
        "seq_len": seq_len,
        "samples": samples,
        "batch_size": batch_size,
        "threads": threads,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-memory-") as tmp:
        for k in k_values:
            row: dict[str, Any] = {"k": k}
            for mode in ("ensemble", "job"):
                snapshot_dir = str(Path(tmp) / f"snapshots_{k}")
                result = _run_training_child(
                    {**spec, "mode": mode, "k": k, "snapshot_dir": snapshot_dir}
                )
                row[mode] = result
            rows.append(row)
    params = rows[0]["ensemble"]["params"]
    ks = [float(row["k"]) for row in rows]
    slopes = {
        mode: _slope(ks, [float(row[mode]["peak_bytes"]) for row in rows]) / params
        for mode in ("ensemble", "job")
    }
    return {"rows": rows, "slopes": slopes, "params": params}


def print_training(result: dict[str, Any]) -> None:
    mib = 2**20
    print(f"training: {result['params'] / 1e6:.2f} M parameters (fp32, AdamW), peak RSS in MiB")
    print(f"{'K':>4} {'ensemble':>10} {'(after setup)':>14} {'job':>8} {'(after setup)':>14}")
    for row in result["rows"]:
        ens, job = row["ensemble"], row["job"]
        print(
            f"{row['k']:>4} {ens['peak_bytes'] / mib:>10.0f} {ens['baseline_bytes'] / mib:>14.0f}"
            f" {job['peak_bytes'] / mib:>8.0f} {job['baseline_bytes'] / mib:>14.0f}"
        )
    slopes = result["slopes"]
    print(
        f"slope, bytes per parameter per added replica: ensemble {slopes['ensemble']:.1f}, "
        f"replica job {slopes['job']:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--training-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.training_child:
        print(json.dumps(_training_child(json.loads(args.training_child))))
        return
    results = {"training": training_memory(args.k, hidden=args.hidden, threads=args.threads)}
    print_training(results["training"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
