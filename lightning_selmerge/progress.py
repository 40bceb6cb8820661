"""Progress bars that show counters as integers: ``v_num: 0`` and ``replica: 3``.

Lightning's ``RichProgressBar`` formats every metric with ``.3f`` (``v_num: 0.000``), and a value
logged with ``self.log`` always becomes a float (``replica: 3.000``). These subclasses override
the documented ``get_metrics`` hook to pass counters as text. ``lightning-selmerge fit`` uses
:func:`default_progress_bar` unless a progress bar is configured or ``enable_progress_bar`` is
false; in Python, pass one in ``Trainer(callbacks=[...])``.

Example:
    >>> integer_metrics({"v_num": 0, "replica": 3.0, "train_loss": 4.25})
    {'v_num': '0', 'replica': '3', 'train_loss': 4.25}
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

__all__ = [
    "COUNTERS",
    "SelmergeRichProgressBar",
    "SelmergeTQDMProgressBar",
    "default_progress_bar",
    "integer_metrics",
]

#: progress-bar entries that count things: shown without decimals.
COUNTERS = frozenset({"v_num", "replica"})


def integer_metrics(metrics: Mapping[str, Any], counters: frozenset[str] = COUNTERS) -> dict:
    """``metrics`` with ints, and the whole-number values of ``counters``, as text."""
    out = dict(metrics)
    for name, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (
            name in counters and isinstance(value, float) and value.is_integer()
        ):
            out[name] = str(int(value))
    return out


def _bar_metrics(metrics: Mapping[str, Any], trainer: Any) -> dict:
    """:func:`integer_metrics`, and a named version whole (Lightning keeps the last four
    characters of a text version: a replica job's ``replica_003`` would show as ``_003``)."""
    out = integer_metrics(metrics)
    version = getattr(trainer.logger, "version", None)
    if "v_num" in out and isinstance(version, str):
        out["v_num"] = version
    return out


class SelmergeRichProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` with integer counters (:func:`integer_metrics`)."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict:
        return _bar_metrics(super().get_metrics(trainer, pl_module), trainer)


class SelmergeTQDMProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` with integer counters (:func:`integer_metrics`)."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict:
        return _bar_metrics(super().get_metrics(trainer, pl_module), trainer)


def default_progress_bar() -> ProgressBar:
    """The bar Lightning would pick (Rich when ``rich`` is installed, else tqdm), with integer
    counters."""
    if importlib.util.find_spec("rich") is not None:
        return SelmergeRichProgressBar()
    return SelmergeTQDMProgressBar()
