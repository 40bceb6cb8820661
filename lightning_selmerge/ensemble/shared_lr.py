"""The learning rate of an optimizer that per-replica (step-interval) schedulers set, when it
also changes between steps for every replica (an epoch-interval schedule, a callback at an
epoch's start such as ``BackboneFinetuning``): the replica's own schedule times the shared changes.

Only the live optimizer is touched, so such a change scales the live replica's learning rate
alone; :class:`SharedFactors` carries it to every replica. The live learning rate over what the
replica's step schedule last set (``get_last_lr()``) is what changed since; the running product
of those changes is :attr:`SharedFactors.now`, each stored replica keeps the product it was
stored at, and a replica loaded again has its stored learning rate scaled by what changed since.

Example:
    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    >>> factors = SharedFactors()
    >>> opt.param_groups[0]["lr"] *= 0.1  # a shared schedule's step at an epoch's end
    >>> factors.observe({0: (opt, [warmup])})
    >>> factors.now, factors.scale(0, replica=3)  # replica 3, stored before the step
    ({0: [0.1]}, [0.1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["SharedFactors", "mixed_optimizers"]

#: optimizer index -> (the optimizer, its step-interval schedulers in the order Lightning steps
#: them), for the optimizers step-interval schedulers set
Mixed = Mapping[int, tuple[torch.optim.Optimizer, Sequence[Any]]]


def mixed_optimizers(
    optimizers: Sequence[torch.optim.Optimizer], swapped: Sequence[Any]
) -> dict[int, tuple[torch.optim.Optimizer, list[Any]]]:
    """The optimizers that ``swapped`` (per-replica) schedulers set: what else changes their
    learning rate between steps (an epoch-interval schedule, a callback at an epoch's start) is
    every replica's."""
    out = {}
    for index, opt in enumerate(optimizers):
        own = [sched for sched in swapped if sched.optimizer is opt]
        if own:
            out[index] = (opt, own)
    return out


class SharedFactors:
    """Per optimizer group, the product of the shared changes so far (:attr:`now`) and, per
    stored replica, the product it was stored at."""

    def __init__(self) -> None:
        self.now: dict[int, list[float]] = {}
        self.at_store: dict[int, dict[int, list[float]]] = {}
        # per optimizer, the rates every step scheduler last reported as set here: one that
        # reports another rate has stepped since
        self._baseline: dict[int, list[float]] = {}

    def _set_baseline(self, index: int, own: Sequence[Any], live: list[float]) -> None:
        _set_last_lrs(own, live)
        self._baseline[index] = list(live)

    def observe(self, mixed: Mixed) -> None:
        """Fold what changed in the live learning rates since the replica's last step (or load)
        into :attr:`now`; from here on that is the new baseline."""
        for index, (opt, own) in mixed.items():
            live = [group["lr"] for group in opt.param_groups]
            factors = self.now.setdefault(index, [])
            factors += [1.0] * (len(live) - len(factors))  # a group added during the fit
            baseline = self._baseline.get(index, [])
            for g, lr in enumerate(live):
                reported = [r[g] for r in (sched.get_last_lr() for sched in own) if g < len(r)]
                if not reported:  # a group added since the schedulers were built
                    continue
                before = _set_by_schedulers(
                    reported, baseline[g] if g < len(baseline) else None, lr
                )
                if before != 0 and lr != before:
                    factors[g] *= lr / before
            self._set_baseline(index, own, live)

    def stored(self, replica: int) -> None:
        """Replica ``replica`` is stored now (its learning rates hold :attr:`now`)."""
        self.at_store[replica] = {i: list(f) for i, f in self.now.items()}

    def scale(self, index: int, replica: int) -> list[float]:
        """What shared changes scaled optimizer ``index``'s groups by since ``replica`` was
        stored (since the fit's start when it never was)."""
        now = self.now.get(index, [])
        then = self.at_store.get(replica, {}).get(index, [])
        then = then + [1.0] * (len(now) - len(then))  # groups added since: from their start
        return [a / b for a, b in zip(now, then)]

    def apply(self, mixed: Mixed, replica: int) -> None:
        """Scale the just-loaded ``replica``'s learning rates by :meth:`scale`."""
        for index, (opt, own) in mixed.items():
            for group, factor in zip(opt.param_groups, self.scale(index, replica)):
                group["lr"] *= factor
            self._set_baseline(index, own, [group["lr"] for group in opt.param_groups])

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now, "at_store": self.at_store}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.now = {int(i): list(f) for i, f in state.get("now", {}).items()}
        self.at_store = {
            int(k): {int(i): list(f) for i, f in per.items()}
            for k, per in state.get("at_store", {}).items()
        }


def _set_by_schedulers(reported: list[float], baseline: float | None, live: float) -> float:
    """The rate the step schedulers set since the baseline (before any shared change): the live
    one when a scheduler reports it, else the last in Lightning's stepping order to report a
    rate other than the baseline (one with ``frequency > 1`` may not have stepped), else the
    baseline."""
    if live in reported:
        return live
    if baseline is None:  # none known (a resumed fit's first observation)
        return reported[-1]
    stepped = [rate for rate in reported if rate != baseline]
    return stepped[-1] if stepped else baseline


def _set_last_lrs(schedulers: Sequence[Any], lrs: list[float]) -> None:
    """What each scheduler reports as its last learning rates (``get_last_lr()``)."""
    for sched in schedulers:
        sched._last_lr = list(lrs)
