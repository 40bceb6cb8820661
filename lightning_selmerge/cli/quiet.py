"""Keep Lightning's advertising out of the command line's output.

Lightning 2.6 logs "💡 Tip: ... try installing litlogger / litmodels ..." through its rank-zero
logger at every fit (Lightning offers no setting for it); :func:`quiet_lightning_tips` drops those
records with a standard :class:`logging.Filter` while the command runs, leaving every other
message of that logger (devices, seeds, warnings) as it is. :class:`HeldLogs` holds a logger's
records back until :meth:`HeldLogs.release` (the CLI's "Seed set to N" waits for the configured
classes to be built, so a refused argument prints its error alone).

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

__all__ = ["DropTips", "HeldLogs", "quiet_lightning_tips"]

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


class HeldLogs(logging.Filter):
    """Within ``with``, the records of logger ``name`` are held back; :meth:`release` logs them.

    Example:
        >>> held = HeldLogs("lightning_selmerge.example")
        >>> with held:
        ...     logging.getLogger("lightning_selmerge.example").warning("later")
        >>> [record.getMessage() for record in held.records]
        ['later']
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def __enter__(self) -> HeldLogs:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)

    def release(self) -> None:
        """Log the held records now (each once)."""
        records, self.records = self.records, []
        for record in records:
            self.logger.handle(record)
