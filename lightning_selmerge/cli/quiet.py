"""Keep Lightning's advertising out of the command line's output.

Lightning 2.6 logs "💡 Tip: ... try installing litlogger / litmodels ..." through its rank-zero
logger at every fit (Lightning offers no setting for it); :func:`quiet_lightning_tips` drops those
records with a standard :class:`logging.Filter` while the command runs, leaving every other
message of that logger (devices, seeds, warnings) as it is.

Example:
    >>> import logging
    >>> record = logging.LogRecord("x", logging.INFO, "", 0, "💡 Tip: try litlogger", None, None)
    >>> DropTips().filter(record)
    False
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DropTips", "quiet_lightning_tips"]

#: the loggers Lightning's ``rank_zero_info`` writes to.
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DropTips(logging.Filter):
    """Drop log records whose message starts with Lightning's "💡 Tip"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip")


@contextmanager
def quiet_lightning_tips() -> Iterator[None]:
    """Within the block, Lightning's "💡 Tip" lines are not logged."""
    drop = DropTips()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
