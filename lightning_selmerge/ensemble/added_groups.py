"""Parameter groups added to the live optimizer during a fit (Lightning's
``BackboneFinetuning`` unfreezes its backbone with ``optimizer.add_param_group`` at an epoch's
start): the stored replicas' optimizer states lack them, and torch refuses to load a state with
fewer groups. :class:`AddedGroups` gives such a state the added groups as they were when added
(their settings, no per-parameter state: the replica has not stepped them yet).

Example:
    >>> import torch
    >>> head, body = torch.nn.Linear(2, 1), torch.nn.Linear(2, 2)
    >>> opt = torch.optim.SGD(head.parameters(), lr=0.1)
    >>> before = opt.state_dict()  # a replica stored before the unfreeze
    >>> opt.add_param_group({"params": body.parameters(), "lr": 0.01})
    >>> added = AddedGroups()
    >>> opt.load_state_dict(added.complete(0, opt, before))
    >>> [group["lr"] for group in opt.param_groups]
    [0.1, 0.01]
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["AddedGroups"]


class AddedGroups:
    """Per optimizer, the settings of the groups added during the fit, taken when first
    needed: before any replica stepped them (they are added at an epoch's start)."""

    def __init__(self) -> None:
        #: optimizer index -> group position -> the group's settings (all but its params)
        self.settings: dict[int, dict[int, dict[str, Any]]] = {}

    def complete(
        self, index: int, opt: torch.optim.Optimizer, saved: dict[str, Any]
    ) -> dict[str, Any]:
        """``saved`` (a state of optimizer ``index``) with the live optimizer's added groups
        appended; ``saved`` itself when it has every group (or differs in more than that)."""
        live = opt.state_dict()["param_groups"]
        groups = saved["param_groups"]
        same = all(a["params"] == b["params"] for a, b in zip(groups, live))
        if len(groups) >= len(live) or not same:
            return saved
        known = self.settings.setdefault(index, {})
        added = []
        for position in range(len(groups), len(live)):
            group = live[position]
            if position not in known:  # first needed: as added, before any replica stepped it
                known[position] = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            added.append({**known[position], "params": group["params"]})
        return {**saved, "param_groups": [*groups, *added]}

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        settings = (state or {}).get("settings", {})
        self.settings = {
            int(i): {int(position): dict(group) for position, group in groups.items()}
            for i, groups in settings.items()
        }
