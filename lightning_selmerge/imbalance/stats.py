"""Statistics of loss against data-order position: segment means and Spearman correlation.

Positions count from 0 (the first sample the replica trained on); ``-1`` means "never seen" and
is skipped, as are non-finite losses. With this convention the paper's finding (early samples keep
a higher loss) shows as a **negative** Spearman rho between position and loss.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional import spearman_corrcoef

__all__ = ["position_loss_spearman", "segment_means"]


def _valid(positions: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.as_tensor(positions).reshape(-1).long().cpu()
    losses = torch.as_tensor(losses).reshape(-1).float().cpu()
    if positions.shape != losses.shape:
        raise ValueError(
            f"positions and losses differ in length: {positions.numel()} vs {losses.numel()}."
        )
    keep = (positions >= 0) & torch.isfinite(losses)
    return positions[keep], losses[keep]


def segment_means(
    positions: torch.Tensor,
    losses: torch.Tensor,
    num_segments: int = 10,
    num_positions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss per position segment.

    Segment ``s`` holds positions ``p`` with ``p * num_segments // num_positions == s``, i.e. the
    ``s``-th tenth (for 10 segments) of the epoch. ``num_positions`` defaults to the largest valid
    position + 1; pass the epoch length when ``positions`` is a subset (a probe).

    Returns:
        ``(means, counts)``, both ``[num_segments]``; an empty segment has mean NaN.

    Example:
        >>> means, counts = segment_means(torch.arange(10), torch.arange(10.0), num_segments=2)
        >>> means.tolist(), counts.tolist()
        ([2.0, 7.0], [5, 5])
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}.")
    pos, loss = _valid(positions, losses)
    means = torch.full((num_segments,), math.nan)
    counts = torch.zeros(num_segments, dtype=torch.long)
    if pos.numel() == 0:
        return means, counts
    total = int(num_positions) if num_positions is not None else int(pos.max()) + 1
    if total <= int(pos.max()):
        raise ValueError(f"num_positions={total} but a position is {int(pos.max())}.")
    seg = (pos * num_segments // total).clamp(max=num_segments - 1)
    sums = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, seg, loss.double())
    counts = torch.bincount(seg, minlength=num_segments)
    nonzero = counts > 0
    means[nonzero] = (sums[nonzero] / counts[nonzero]).float()
    return means, counts


def position_loss_spearman(positions: torch.Tensor, losses: torch.Tensor) -> float:
    """Spearman rank correlation between position and loss (NaN with fewer than 3 samples).

    Example:
        >>> round(position_loss_spearman(torch.arange(50), torch.arange(50.0) ** 2), 4)
        1.0
    """
    pos, loss = _valid(positions, losses)
    if pos.numel() < 3 or bool((loss == loss[0]).all()) or bool((pos == pos[0]).all()):
        return math.nan
    return float(spearman_corrcoef(pos.double(), loss.double()))
