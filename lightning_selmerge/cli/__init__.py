"""The ``lightning-selmerge`` command.

Subcommands:

* ``fit``, ``validate``, ``test``, ``predict``: Lightning's CLI (:mod:`.train`), e.g.
  ``lightning-selmerge fit --config configs/demo.yaml``;
* ``merge``: merge saved replica checkpoints out of core (:mod:`.merge`);
* ``report``: figures and a summary from a run's TensorBoard logs (:mod:`.report`).

Lightning (and transformers) are imported only by the subcommands that need them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

_USAGE = """usage: lightning-selmerge {fit,validate,test,predict,merge,report} ...
  fit, validate, test, predict   Lightning's CLI with DataOrderEnsemble, SelectionMergeCallback,
                                 PositionLossMonitor and the Hugging Face modules registered
                                 (see: lightning-selmerge fit --help); the shipped modules
                                 implement fit and validate, test and predict need a module
                                 with test_step/predict_step and their loaders
  merge                          merge saved replica checkpoints (lightning-selmerge merge --help)
  report                         figures + summary from TensorBoard logs (... report --help)"""


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
        print(_USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command = argv[0]
    rest = argv if command in ("fit", "validate", "test", "predict") else argv[1:]
    return _COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
