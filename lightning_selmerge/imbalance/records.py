"""Columnar records of (sample, replica, epoch, position, loss) rows."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["PositionRecords"]

_COLUMNS = ("sample", "replica", "epoch", "position", "loss")


class PositionRecords:
    """Append-only table of when each sample was trained on and what its loss was.

    ``loss`` is NaN where no per-sample training loss was available. Rows are kept as chunks and
    concatenated on demand; :meth:`state_dict` / :meth:`load_state_dict` make it checkpointable.

    Example:
        >>> rec = PositionRecords()
        >>> rec.add(torch.tensor([4, 2]), torch.tensor([0, 1]), epoch=0, replica=0)
        >>> rec.add(torch.tensor([2, 4]), torch.tensor([0, 1]), epoch=1, replica=0,
        ...         loss=torch.tensor([0.5, 0.7]))
        >>> rec.first_positions(num_samples=5).tolist()
        [-1, -1, 1, -1, 0]
        >>> rec.table(epoch=1)["loss"].tolist()
        [0.5, 0.699999988079071]
    """

    def __init__(self) -> None:
        self._chunks: list[dict[str, torch.Tensor]] = []

    def add(
        self,
        sample: torch.Tensor,
        position: torch.Tensor,
        epoch: int,
        replica: int = 0,
        loss: torch.Tensor | None = None,
    ) -> None:
        """Append one batch of rows."""
        sample = torch.as_tensor(sample).reshape(-1).long().cpu()
        position = torch.as_tensor(position).reshape(-1).long().cpu()
        if sample.shape != position.shape:
            raise ValueError("PositionRecords.add: sample and position differ in length.")
        n = sample.numel()
        if loss is None:
            loss_t = torch.full((n,), math.nan)
        else:
            loss_t = torch.as_tensor(loss).detach().reshape(-1).float().cpu()
            if loss_t.numel() != n:
                raise ValueError(
                    f"PositionRecords.add: {loss_t.numel()} losses for {n} samples; a per-sample "
                    "loss must have shape [B]."
                )
        self._chunks.append(
            {
                "sample": sample,
                "replica": torch.full((n,), int(replica), dtype=torch.long),
                "epoch": torch.full((n,), int(epoch), dtype=torch.long),
                "position": position,
                "loss": loss_t,
            }
        )

    def __len__(self) -> int:
        return sum(c["sample"].numel() for c in self._chunks)

    def table(
        self, epoch: int | None = None, replica: int | None = None
    ) -> dict[str, torch.Tensor]:
        """All rows (optionally of one epoch / replica) as a dict of 1-D column tensors."""
        if self._chunks:
            cols = {k: torch.cat([c[k] for c in self._chunks]) for k in _COLUMNS}
        else:
            cols = {
                k: torch.empty(0, dtype=torch.float if k == "loss" else torch.long)
                for k in _COLUMNS
            }
        keep = torch.ones(cols["sample"].numel(), dtype=torch.bool)
        if epoch is not None:
            keep &= cols["epoch"] == epoch
        if replica is not None:
            keep &= cols["replica"] == replica
        return {k: v[keep] for k, v in cols.items()}

    def first_positions(
        self, num_samples: int | None = None, replica: int = 0, epoch: int = 0
    ) -> torch.Tensor:
        """Sample index -> smallest position recorded in ``epoch`` (``-1`` if never seen)."""
        rows = self.table(epoch=epoch, replica=replica)
        if num_samples is None:
            num_samples = int(rows["sample"].max()) + 1 if rows["sample"].numel() else 0
        big = torch.iinfo(torch.long).max
        out = torch.full((num_samples,), big, dtype=torch.long)
        out.scatter_reduce_(0, rows["sample"], rows["position"], reduce="amin")
        out[out == big] = -1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"columns": self.table()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cols = state["columns"]
        chunk = {k: torch.as_tensor(cols[k]) for k in _COLUMNS}
        self._chunks = [chunk] if chunk["sample"].numel() else []

    def merge(self, other_tables: list[dict[str, torch.Tensor]]) -> None:
        """Replace the rows by the concatenation of ``other_tables`` (e.g. gathered from ranks)."""
        self._chunks = [t for t in other_tables if t["sample"].numel()]
