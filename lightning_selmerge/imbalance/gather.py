"""Records and probe losses of every rank on every rank (one ``all_gather_object`` each)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_selmerge.imbalance.replicas import ProbeTarget

__all__ = ["gather_losses", "gather_tables", "in_replica_order"]

Table = dict[str, torch.Tensor]


def gather_tables(table: Mapping[str, torch.Tensor]) -> list[Table]:
    """Every rank's ``table`` (columns of records), in rank order, on every rank."""
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, dict(table))
    return everyone


def in_replica_order(tables: Sequence[Mapping[str, torch.Tensor]]) -> Table:
    """The rows of ``tables`` by replica, then position (stable): the order in which one
    device records an epoch, each replica's pass running in position order.

    Example:
        >>> rows = {"replica": torch.tensor([1, 0]), "position": torch.tensor([0, 1])}
        >>> more = {"replica": torch.tensor([0]), "position": torch.tensor([0])}
        >>> {k: v.tolist() for k, v in in_replica_order([rows, more]).items()}
        {'replica': [0, 0, 1], 'position': [0, 1, 0]}
    """
    rows = {k: torch.cat([part[k] for part in tables]) for k in tables[0]}
    positions = rows["position"]
    span = int(positions.max()) + 1 if positions.numel() else 1
    key = rows["replica"] * span + positions
    order = torch.sort(key, stable=True).indices
    return {k: v[order] for k, v in rows.items()}


def gather_losses(
    targets: Sequence[ProbeTarget], local: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every target's losses on every rank, in target order, each from the first rank (in rank
    order) that probed it.

    The shard ranks of one replica evaluate it together and get the same losses; a model every
    rank holds (a merge) is taken from rank 0.
    """
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, dict(local))
    out: dict[str, torch.Tensor] = {}
    for target in targets:
        found = next((part[target.name] for part in everyone if target.name in part), None)
        if found is None:
            raise RuntimeError(
                f"PositionLossMonitor: no rank probed {target.name!r}; the strategy's "
                "probe_targets() must mark it local=True on the ranks that hold it."
            )
        out[target.name] = found
    return out
