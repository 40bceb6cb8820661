"""Probe results: one model's per-sample losses binned by first-epoch position."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lightning_selmerge.imbalance.stats import position_loss_spearman, segment_means

__all__ = ["ProbeResult", "bin_losses", "lookup_positions", "result_metrics", "row_positions"]


@dataclass
class ProbeResult:
    """Losses of the probe samples for one model, binned by first-epoch position."""

    name: str
    indices: torch.Tensor
    positions: torch.Tensor
    losses: torch.Tensor
    segment_means: torch.Tensor
    segment_counts: torch.Tensor
    spearman: float
    mean_loss: float = field(default=math.nan)


def lookup_positions(first: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``first[indices]``, with -1 for indices beyond ``first``.

    Example:
        >>> lookup_positions(torch.tensor([2, 0, 1]), torch.tensor([1, 2, 5])).tolist()
        [0, 1, -1]
    """
    out = torch.full_like(indices, -1)
    in_range = indices < first.numel()
    out[in_range] = first[indices[in_range]]
    return out


def bin_losses(
    name: str,
    indices: torch.Tensor,
    losses: torch.Tensor,
    positions: torch.Tensor,
    num_segments: int,
    num_positions: int,
) -> ProbeResult:
    """Bin ``losses`` of samples ``indices`` at ``positions`` (-1: unknown) into segments.

    Example:
        >>> result = bin_losses("m", torch.arange(4), torch.tensor([4.0, 3.0, 2.0, 1.0]),
        ...                     torch.arange(4), num_segments=2, num_positions=4)
        >>> result.segment_means.tolist(), round(result.spearman, 4), result.mean_loss
        ([3.5, 1.5], -1.0, 2.5)
    """
    indices = indices.long()
    means, counts = segment_means(
        positions, losses, num_segments, num_positions=max(num_positions, 1)
    )
    valid = (positions >= 0) & torch.isfinite(losses)
    mean_loss = float(losses[valid].mean()) if bool(valid.any()) else math.nan
    return ProbeResult(
        name=name,
        indices=indices,
        positions=positions,
        losses=losses,
        segment_means=means,
        segment_counts=counts,
        spearman=position_loss_spearman(positions, losses),
        mean_loss=mean_loss,
    )


def row_positions(
    by_replica: Mapping[int, torch.Tensor], samples: torch.Tensor, replicas: torch.Tensor
) -> torch.Tensor:
    """First-epoch position of every row in its own replica's pass (-1: unknown).

    Example:
        >>> by_replica = {0: torch.tensor([0, 1]), 1: torch.tensor([1, 0])}
        >>> row_positions(by_replica, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])).tolist()
        [0, 1, -1]
    """
    out = torch.full_like(samples, -1)
    for replica in replicas.unique().tolist():
        first = by_replica.get(int(replica))
        if first is not None:
            rows = replicas == replica
            out[rows] = lookup_positions(first, samples[rows])
    return out


def result_metrics(result: ProbeResult, prefix: str) -> dict[str, float]:
    """The scalar tags and values of one result: ``<prefix>/<name>/spearman``, ``.../mean_loss``
    and ``.../segment_{ss}_loss`` (``<prefix>/spearman``, ... for the name ``""``).

    Example:
        >>> result = bin_losses("merged", torch.arange(2), torch.tensor([2.0, 1.0]),
        ...                     torch.arange(2), num_segments=1, num_positions=2)
        >>> sorted(result_metrics(result, "imbalance"))  # doctest: +NORMALIZE_WHITESPACE
        ['imbalance/merged/mean_loss', 'imbalance/merged/segment_00_loss',
         'imbalance/merged/spearman']
    """
    head = f"{prefix}/{result.name}" if result.name else prefix
    metrics = {f"{head}/spearman": result.spearman, f"{head}/mean_loss": result.mean_loss}
    for s, value in enumerate(result.segment_means.tolist()):
        metrics[f"{head}/segment_{s:02d}_loss"] = value
    return metrics
