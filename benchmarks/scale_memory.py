"""Peak host memory against the number of replicas K, both ways (issue 18, item 5).

(a) the in-process ensemble: one ``DataOrderEnsemble`` fit holding K replicas' training states;
(b) replica jobs: one ordinary fit per replica (:mod:`scale_memory_training`), then the
streaming merge of their K checkpoints (:mod:`scale_memory_merge`).

Prints peak RSS per K and the slopes in bytes per parameter per added replica, and what they
mean for the paper's setting (K = 20 replicas of a 7B model). Each half also runs on its own.
Run from the repository root (about 5 minutes on 2 cores)::

    python benchmarks/scale_memory.py
    python benchmarks/scale_memory.py --k 2 4 --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_memory_merge import merge_memory, merge_report
from scale_memory_training import print_training, training_memory

PAPER_PARAMS, PAPER_K = 7e9, 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16], help="values of K")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    training = training_memory(args.k, threads=args.threads)
    print_training(training)
    merge = merge_memory(args.k, merges=("streaming",))
    print(merge_report(merge))
    ensemble = training["slopes"]["ensemble"]
    job = training["slopes"]["job"]
    streaming = merge["merges"]["streaming"]["slope_bytes_per_param"]
    tb = PAPER_PARAMS * PAPER_K / 1e12
    print(
        f"\nK = {PAPER_K} x {PAPER_PARAMS / 1e9:.0f}B parameters: (a) the ensemble holds about "
        f"{ensemble * tb:.2f} TB of replica state on the host ({ensemble:.1f} B/param/replica); "
        f"(b) each job grows {job:.2f} B/param with K and the streaming merge "
        f"{streaming:.3f} B/param per replica: {streaming * tb * 1e3:.1f} GB in all beyond one "
        "model's merge state"
    )
    if args.json:
        args.json.write_text(json.dumps({"training": training, "merge": merge}, indent=2) + "\n")
    flat = merge["merges"]["streaming"]["slope_over_model_bytes"] <= 0.1
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
