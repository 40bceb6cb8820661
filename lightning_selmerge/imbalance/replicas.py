"""Who trains what: the interface through which a strategy tells the monitor about its replicas.

A strategy that trains several replicas of the model in one fit (one after another inside each
epoch, possibly on several replica groups of ranks) implements :class:`ReplicaSchedule`;
:class:`~lightning_selmerge.imbalance.PositionLossMonitor` finds it as ``trainer.strategy`` and
asks it which replica trains each batch, where the batch's samples sit in that replica's order,
and which models to probe. This module knows nothing of merging: a merged model is just one more
:class:`ProbeTarget` that the strategy lists.

Example:
    >>> import torch
    >>> class TwoReplicas:  # batches 0-2 train replica 0, batches 3-5 replica 1 (batch size 4)
    ...     num_replicas = 2
    ...     def replica_of(self, batch_idx):
    ...         return batch_idx // 3
    ...     def batch_positions(self, batch_idx):
    ...         start = (batch_idx % 3) * 4
    ...         return torch.arange(start, start + 4)
    ...     def probe_targets(self):
    ...         return [ProbeTarget(f"replica_{k}", None, replica=k) for k in range(2)]
    ...     def module_state(self):
    ...         return {}
    ...     def load_module_state(self, state):
    ...         pass
    >>> schedule = TwoReplicas()
    >>> isinstance(schedule, ReplicaSchedule)
    True
    >>> schedule.replica_of(4), schedule.batch_positions(4).tolist()
    (1, [4, 5, 6, 7])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["ProbeTarget", "ReplicaSchedule"]


@dataclass
class ProbeTarget:
    """One model to probe at a probe epoch.

    ``state_dict`` is loaded into the LightningModule for the evaluation (``None``: the live
    weights as they are); the losses are binned by the first-epoch positions of ``replica``.
    ``local=False`` marks a model that this rank does not hold (on several replica groups each
    rank holds its group's replicas only): its losses come from the ranks that hold it.
    """

    name: str
    state_dict: Mapping[str, torch.Tensor] | None
    replica: int = 0
    local: bool = True


@runtime_checkable
class ReplicaSchedule(Protocol):
    """What a strategy training ``num_replicas`` replicas in one fit tells the monitor.

    Every method speaks of this rank's training batches in the epoch in progress, indexed by
    Lightning's ``batch_idx``; the strategy may hand each rank other replicas (replica groups)
    and other batches of one replica (shard ranks).
    """

    num_replicas: int

    def replica_of(self, batch_idx: int) -> int:
        """The replica that training batch ``batch_idx`` of the epoch trains."""
        ...

    def batch_positions(self, batch_idx: int) -> torch.Tensor:
        """Positions of batch ``batch_idx``'s samples in its replica's order of the epoch: the
        arrival index in the pass of the replica's whole group (all its shard ranks), position
        0 first; positions past the order's end are wrap-around padding (the sample at
        ``position % len(order)``), as with a padded ``DataOrderSampler``."""
        ...

    def probe_targets(self) -> list[ProbeTarget]:
        """The models to probe at a probe epoch, in logging order, the same names on every
        rank (those this rank does not hold with ``local=False``); a list, captured before any
        target is loaded."""
        ...

    def module_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the live module's state (this rank's slices when sharded)."""
        ...

    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a state from :meth:`module_state` or a :class:`ProbeTarget` into the module."""
        ...
