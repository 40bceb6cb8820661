"""First-epoch positions per replica, from the records (else from the data-order sampler)."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.imbalance.batches import positions_agree
from lightning_selmerge.imbalance.records import PositionRecords

__all__ = ["first_epoch_positions"]


def first_epoch_positions(
    records: PositionRecords,
    num_samples: int | None,
    current_replica: int,
    sampler: DataOrderSampler | None,
    num_replicas: int | None = None,
) -> tuple[dict[int, torch.Tensor], int] | None:
    """``({replica: sample -> first-epoch position}, primary replica)``; ``None`` (with a
    warning) when nothing tells the positions.

    Every replica recorded in epoch 0 gets its observed positions; the primary replica is 0
    (else the first recorded) when several were recorded, else ``current_replica``, whose
    positions come from ``sampler`` when it was not recorded. With ``num_replicas`` (an
    ensemble's K) every replica not recorded (a monitor added at a resume after epoch 0) gets
    ``sampler``'s positions, and the primary is 0. Observed positions that contradict
    ``sampler``'s order are kept, with a warning.

    Example:
        >>> records = PositionRecords()
        >>> records.add(torch.tensor([2, 0]), torch.tensor([0, 1]), epoch=0, replica=1)
        >>> by_replica, primary = first_epoch_positions(records, 3, 1, None)
        >>> by_replica[1].tolist(), primary
        ([1, -1, 0], 1)
    """
    recorded = [int(r) for r in records.table(epoch=0)["replica"].unique().tolist()]
    several = len(recorded) > 1
    primary = (0 if 0 in recorded else recorded[0]) if several else current_replica
    by_replica = {r: records.first_positions(num_samples, replica=r, epoch=0) for r in recorded}
    if primary not in by_replica:
        if sampler is None:
            rank_zero_warn(
                "PositionLossMonitor: no first-epoch records and no DataOrderSampler; "
                "loss-by-position is not available for this run."
            )
            return None
        by_replica[primary] = sampler.positions(epoch=0, replica=primary)
    if sampler is not None and num_replicas is not None:
        for replica in range(num_replicas):
            if replica not in by_replica:
                by_replica[replica] = sampler.positions(epoch=0, replica=replica)
        primary = 0
    if sampler is not None and not all(
        positions_agree(by_replica[r], sampler.positions(epoch=0, replica=r)) for r in recorded
    ):
        rank_zero_warn(
            "PositionLossMonitor: the positions observed in training_step differ from "
            "the DataOrderSampler's order for epoch 0; using the observed ones."
        )
    return by_replica, primary
