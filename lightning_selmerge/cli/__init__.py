"""The ``lightning-selmerge`` command.

Subcommands:

* ``fit``, ``validate``, ``test``, ``predict``: Lightning's CLI (:mod:`.train`), e.g.
  ``lightning-selmerge fit --config configs/demo.yaml``;
* ``merge``: merge saved replica checkpoints out of core (:mod:`.merge`);
* ``report``: figures and a summary from a run's TensorBoard logs (:mod:`.report`).

Lightning (and transformers) are imported only by the subcommands that need them. A user
mistake (a bad config value, a missing file, a bad merge input) prints one line naming the
problem, then a line naming ``--debug``, and exits with status 2; a merge that fails on the
machine's side (a full disk: :class:`OSError`) does the same with status 1. ``--debug`` or
``SELMERGE_DEBUG=1`` shows the traceback instead, for every subcommand (:mod:`.errors`). Called
from Python, the library raises the typed exception.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .errors import DEBUG_ENV, DEBUG_FLAG, is_user_mistake, user_message

__all__ = ["main"]

_USAGE = """usage: lightning-selmerge {fit,validate,test,predict,merge,report} ...
  fit, validate, test, predict   Lightning's CLI with DataOrderEnsemble, SelectionMergeCallback,
                                 PositionLossMonitor and the Hugging Face modules registered
                                 (see: lightning-selmerge fit --help); the shipped modules
                                 implement fit and validate, test and predict need a module
                                 with test_step/predict_step and their loaders
  merge                          merge saved replica checkpoints (lightning-selmerge merge --help)
  report                         figures + summary from TensorBoard logs (... report --help)
  --debug (or SELMERGE_DEBUG=1)  show the traceback of an error in the input"""


def _lightning(argv: Sequence[str]) -> int:
    from .train import run_lightning

    return run_lightning(argv)


def _merge(argv: Sequence[str]) -> int:
    from .merge import run_merge

    return run_merge(argv)


def _report(argv: Sequence[str]) -> int:
    from .report import run_report

    return run_report(argv)


_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "merge": _merge,
    "report": _report,
    **{name: _lightning for name in ("fit", "validate", "test", "predict")},
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        asked = argv[:1] in (["-h"], ["--help"])  # help goes to stdout, as argparse's does
        print(_USAGE, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    command = argv[0]
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    rest = argv if command in ("fit", "validate", "test", "predict") else argv[1:]
    try:
        return _COMMANDS[command](rest)
    except Exception as err:
        if is_user_mistake(err):
            status = 2
        elif command == "merge" and isinstance(err, OSError):
            status = 1  # a full disk, say: the merge left the output as it was and says so
        else:
            raise
        if debug:
            raise
        message = user_message(err)
        if isinstance(err, argparse.ArgumentError):
            message += f" (options: lightning-selmerge {command} --help)"
        print(f"lightning-selmerge {command}: error: {message}", file=sys.stderr)
        print(f"(add {DEBUG_FLAG} or set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
