"""``lightning-selmerge report LOGDIR``: figures and a markdown summary from TensorBoard logs."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from lightning_selmerge.report import write_report

__all__ = ["report_parser", "run_report"]


def report_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning-selmerge report",
        description="Write loss-by-position and merged-vs-replica validation figures (PNG) and "
        "summary.md from the newest TensorBoard run under LOGDIR.",
        exit_on_error=False,  # lightning-selmerge prints a parse error on one line
    )
    parser.add_argument("logdir", help="a TensorBoard log directory (searched recursively)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/report)")
    parser.add_argument("--metric", default="val_loss", help="validation metric to compare")
    parser.add_argument(
        "--mode",
        choices=["min", "max"],
        default=None,
        help="lower (min) or higher (max) is better (default: max for names with "
        "acc/f1/auc/precision/recall, else min)",
    )
    parser.add_argument(
        "--tag_prefix",
        default="imbalance",
        help="the PositionLossMonitor's tag_prefix (first part of its tags)",
    )
    return parser


def run_report(argv: Sequence[str]) -> int:
    args = report_parser().parse_args(list(argv))
    written = write_report(
        args.logdir, args.out, metric=args.metric, mode=args.mode, tag_prefix=args.tag_prefix
    )
    for path in written:
        print(path)
    summary = next(p for p in written if p.name == "summary.md")
    print()
    print(summary.read_text(encoding="utf-8"))
    return 0
