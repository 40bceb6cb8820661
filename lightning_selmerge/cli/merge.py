"""``lightning-selmerge merge``: merge saved checkpoints out of core.

``lightning-selmerge merge REPLICA... --out DIR`` merges safetensors files or Hugging Face model
directories::

    lightning-selmerge merge runs/r0 runs/r1 runs/r2 runs/r3 --base base_model \\
        --method selection --resample 1 --seed 0 --out merged

``lightning-selmerge merge --epoch_dir SNAPSHOTS/epoch_002 --out DIR`` merges what a job array of
replica jobs wrote for one epoch (``replica_000.safetensors`` or ``replica_000/``, ...), refusing
missing replicas unless ``--allow_missing``; it streams the replicas (one open at a time, the
same bits as the all-at-once merge). The first form maps every replica at once unless
``--streaming true`` or ``--draw_prefix`` (which only the streaming merge takes) is given:
faster, and it also runs where the replicas exceed the memory (their pages are the kernel's to
drop and read again), while the streaming merge needs its window of state (256 MiB, or one
tensor's state where that is larger) on top (docs/performance.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from lightning_selmerge.merging import (
    MergeError,
    load_rules,
    merge_checkpoints,
)
from lightning_selmerge.merging.checkpoints import PROVENANCE_NAME
from lightning_selmerge.merging.methods import (
    MergeMethod,
    MethodParameter,
    build_method,
    method_class,
    method_names,
)
from lightning_selmerge.merging.snapshots import merge_by_path_hint, merge_epoch
from lightning_selmerge.merging.streaming_files import merge_checkpoints_streaming

__all__ = ["merge_parser", "method_from_args", "run_merge"]


def _method_options() -> dict[str, tuple[MethodParameter, list[str]]]:
    """Every registered method's parameters by name, with the methods that take each."""
    options: dict[str, tuple[MethodParameter, list[str]]] = {}
    for name in method_names():
        for parameter in method_class(name).parameters():
            known = options.setdefault(parameter.name, (parameter, []))
            if known[0].type != parameter.type:
                raise TypeError(
                    f"merge methods {known[1]} and {name!r} declare parameter {parameter.name!r} "
                    f"with different types ({known[0].type} and {parameter.type})"
                )
            known[1].append(name)
    return options


def _option_help(name: str, methods: Sequence[str]) -> str:
    """The help of option ``--name``: each method's own, the methods with the same text grouped,
    e.g. ``dare, ties: mean|selection (default: mean); task_arithmetic: sum|selection ...``."""
    by_text: dict[str, list[str]] = {}
    for method in methods:
        (parameter,) = [p for p in method_class(method).parameters() if p.name == name]
        by_text.setdefault(parameter.help, []).append(method)
    parts = []
    for text, takers in by_text.items():
        prefix = f"{', '.join(takers)}: "
        parts.append(prefix + text.removeprefix(prefix))
    return "; ".join(parts)


def merge_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning-selmerge merge",
        description="Merge K fine-tuned replicas saved as safetensors into one model directory.",
        exit_on_error=False,  # lightning-selmerge prints a parse error on one line
    )
    parser.add_argument(
        "replicas",
        nargs="*",
        default=[],  # not "(required)" in --help: --epoch_dir takes their place
        help="replica checkpoints (files or HF dirs); required unless --epoch_dir",
    )
    parser.add_argument(
        "--epoch_dir",
        default=None,
        help="merge the replica_000, replica_001, ... snapshots a job array wrote for one epoch",
    )
    parser.add_argument(
        "--num_replicas",
        type=int,
        default=None,
        help="--epoch_dir: K, to find missing replicas (default: the snapshots' records)",
    )
    parser.add_argument(
        "--allow_missing",
        action="store_true",
        help="--epoch_dir: merge the replicas present when some are missing",
    )
    parser.add_argument(
        "--streaming",
        type=bool | None,
        default=None,
        help="true: read one replica at a time (same bits; each file read in one sequential "
        "pass); false: map all at once (faster, and works where the replicas exceed memory); "
        "default: streaming for --epoch_dir and for replica paths with --draw_prefix, else all "
        "at once",
    )
    parser.add_argument(
        "--draw_prefix",
        default=None,
        help="prefix of tensor names in the random draws (e.g. 'model.' to match an in-process "
        "ensemble whose LightningModule holds the HF model as self.model; default: none)",
    )
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--base", default=None, help="pre-trained checkpoint (needed by resample)")
    parser.add_argument(
        "--method",
        default="selection",
        choices=method_names(),
        help="merge method; its options are those below that name it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    for name, (parameter, methods) in _method_options().items():
        parser.add_argument(
            f"--{name}", type=parameter.type | None, default=None, help=_option_help(name, methods)
        )
    parser.add_argument(
        "--rules",
        default=None,
        help="YAML list of {pattern, method, ...}: per-tensor methods, first wins",
    )
    parser.add_argument(
        "--shard_size", type=int, default=5 * 2**30, help="max bytes per shard (default: 5 GiB)"
    )
    parser.add_argument("--chunk_numel", type=int, default=1 << 20, help="elements merged at once")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--drop_nonfinite",
        action="store_true",
        help="leave out replicas holding NaN/Inf (default: refuse to merge, naming them)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def method_from_args(args: Any) -> MergeMethod:
    """The ``--method`` with the options given (an option it does not take is refused)."""
    options = _method_options()
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    takes = {p.name for p in method_class(args.method).parameters()}
    stray = sorted(set(given) - takes)
    if stray:
        raise MergeError(
            f"--{stray[0]} is not an option of --method {args.method} (it takes "
            f"{', '.join(f'--{t}' for t in sorted(takes)) or 'no options'}); "
            f"--{stray[0]} is for {', '.join(options[stray[0]][1])}"
        )
    return build_method(args.method, given)


class _BytesBar:
    """The merge's progress in bytes of merged output with its total, shown from the first
    tensor on (a merge refused before it starts prints no bar); a merge that starts over
    (``--drop_nonfinite``) restarts the bar."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                desc="merging", total=total, unit="B", unit_scale=True, unit_divisor=1024
            )
        elif done < self.bar.n:
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_list_options(argv: Sequence[str]) -> None:
    """A list option given bare values (``--weights 1 3``): name the form it takes."""
    lists = [f"--{n}" for n, (p, _) in _method_options().items() if "Sequence" in str(p.type)]
    for i, token in enumerate(argv):
        name, equals, value = token.partition("=")
        if name not in lists:
            continue
        value = value if equals else (argv[i + 1] if i + 1 < len(argv) else "")
        if not value.lstrip().startswith("["):
            example = "[0.5,0.25,0.25]" if name == "--probabilities" else "[1,1,2]"
            raise MergeError(
                f"{name} takes a list, one value per replica: {name} '{example}' "
                f"(got {name} {value})"
            )


def run_merge(argv: Sequence[str]) -> int:
    _check_list_options(argv)
    args = merge_parser().parse_args(list(argv))
    bar = _BytesBar(enabled=not args.quiet)
    try:
        method = method_from_args(args)
        rules = load_rules(args.rules) if args.rules else []
        common = dict(
            method=method,
            base=args.base,
            rules=rules,
            seed=args.seed,
            chunk_numel=args.chunk_numel,
            max_shard_bytes=args.shard_size,
            overwrite=args.overwrite,
            progress=bar,
            nonfinite="drop" if args.drop_nonfinite else "error",
        )
        if args.epoch_dir is not None:
            if args.replicas:
                raise MergeError("give replica paths or --epoch_dir, not both")
            if args.streaming is False:
                raise MergeError(
                    "--streaming false maps every replica at once, and --epoch_dir reads one at a "
                    f"time: {merge_by_path_hint(args.epoch_dir)}"
                )
            out = merge_epoch(
                args.epoch_dir,
                args.out,
                num_replicas=args.num_replicas,
                allow_missing=args.allow_missing,
                draw_prefix=args.draw_prefix or "",
                **common,
            )
        elif not args.replicas:
            raise MergeError("no replicas: give replica paths or --epoch_dir SNAPSHOTS/epoch_N")
        elif args.num_replicas is not None or args.allow_missing:
            raise MergeError("--num_replicas and --allow_missing go with --epoch_dir")
        elif args.streaming or (args.draw_prefix and args.streaming is None):
            out = merge_checkpoints_streaming(
                args.replicas, args.out, draw_prefix=args.draw_prefix or "", **common
            )
        elif args.draw_prefix:
            raise MergeError("--draw_prefix needs the streaming merge: add --streaming true")
        else:
            out = merge_checkpoints(args.replicas, args.out, **common)
    finally:
        bar.close()
    provenance = json.loads((Path(out) / PROVENANCE_NAME).read_text())
    for entry in provenance.get("dropped_nonfinite", []):
        print(
            f"dropped replica {entry['replica']} ({entry['path']}): NaN/Inf in tensor "
            f"{entry['tensor']!r}",
            file=sys.stderr,
        )
    missing = provenance.get("missing_replicas")
    note = f" (missing: {', '.join(map(str, missing))})" if missing else ""
    print(f"merged {len(provenance['replicas'])} replicas into {out}{note}")
    return 0
