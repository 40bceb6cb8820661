"""Cost of training K replicas in one ensemble fit versus K plain fits of one replica.

What it measures (a tiny GPT-2 built from a config, random tokens, CPU by default):

* ``single``: one plain ``Trainer.fit`` of the module (default strategy), ``--epochs`` epochs
  over ``--samples`` sequences; run ``--k`` times (a fresh process each), the times summed:
  what training the K replicas one by one costs.
* ``ensemble``: one ``Trainer.fit`` with ``DataOrderEnsemble(num_replicas=K)`` and
  ``SelectionMergeCallback(method="selection", resample=1, validate_replicas=False)``: the same
  K × epochs × batches of training plus the replica swaps and one merge per epoch
  (``--offload disk`` puts the inactive replicas in files).

Each fit runs in its own subprocess; its "fit s" is the wall time of ``trainer.fit`` (imports,
model construction and data excluded), and its peak RSS is the child's ``ru_maxrss`` (via
``os.wait4``; this parent never imports torch). Prints the ratio
``ensemble fit s / (K × single fit s)`` (target ≤ 1.10) and peak RSS of the ensemble versus a
single fit. Repeats round-robin ``--repeats`` times and reports the best of each.

Run from the repository root::

    python benchmarks/ensemble_overhead.py                      # K=4, ~2 minutes on 2 cores
    python benchmarks/ensemble_overhead.py --k 2 --epochs 1 --json /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from fit_support import quiet_trainer_kwargs, run_child, tiny_gpt2_fit_inputs


def child(spec: dict[str, Any]) -> dict[str, float]:
    """Build the model and data, run one fit, return its wall time."""
    from lightning.pytorch import Trainer

    from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback

    module, loader = tiny_gpt2_fit_inputs(spec)
    kwargs: dict[str, Any] = {}
    if spec["mode"] == "ensemble":
        kwargs["strategy"] = DataOrderEnsemble(
            num_replicas=spec["k"], seed=0, offload=spec["offload"]
        )
        kwargs["callbacks"] = [
            SelectionMergeCallback(resample=1, validate_replicas=False, log_replica_loss=False)
        ]
    trainer = Trainer(max_epochs=spec["epochs"], **quiet_trainer_kwargs(), **kwargs)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return {"fit_s": time.perf_counter() - start}


def run_fit(spec: dict[str, Any]) -> tuple[float, int]:
    """(fit seconds, peak RSS kB) of one fit in a fresh interpreter."""
    result, peak_bytes = run_child(__file__, "--child", spec)
    return result["fit_s"], peak_bytes // 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=4, help="number of replicas")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256, help="training sequences")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--offload", choices=("cpu", "disk"), default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    spec = {
        key: getattr(args, key)
        for key in (
            "k", "epochs", "samples", "batch_size", "seq_len", "hidden", "layers", "vocab",
            "threads", "offload",
        )
    }  # fmt: skip
    single: list[tuple[float, int]] = []
    ensemble: list[tuple[float, int]] = []
    for repeat in range(args.repeats):
        single.append(run_fit({**spec, "mode": "single"}))
        ensemble.append(run_fit({**spec, "mode": "ensemble"}))
        print(
            f"repeat {repeat + 1}: single fit {single[-1][0]:.2f} s, "
            f"ensemble fit {ensemble[-1][0]:.2f} s",
            flush=True,
        )
    single_s = min(s for s, _ in single)
    ensemble_s = min(s for s, _ in ensemble)
    single_rss = max(r for _, r in single) / 1024
    ensemble_rss = max(r for _, r in ensemble) / 1024
    ratio = ensemble_s / (args.k * single_s)
    print(
        f"\nK={args.k}, {args.epochs} epochs, {args.samples} sequences x {args.seq_len} tokens, "
        f"GPT-2 {args.layers} layers x {args.hidden}, offload={args.offload}"
    )
    print(f"  single fit           {single_s:8.2f} s   peak RSS {single_rss:8.0f} MB")
    print(f"  K x single fit       {args.k * single_s:8.2f} s")
    print(f"  ensemble fit         {ensemble_s:8.2f} s   peak RSS {ensemble_rss:8.0f} MB")
    print(f"  ratio ensemble / (K x single): {ratio:.3f}  (target <= 1.10)")
    print(f"  peak RSS ensemble / single:    {ensemble_rss / single_rss:.2f}")
    if args.json:
        result = {
            **spec,
            "single_fit_s": single_s,
            "ensemble_fit_s": ensemble_s,
            "ratio": ratio,
            "single_peak_rss_mb": single_rss,
            "ensemble_peak_rss_mb": ensemble_rss,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
