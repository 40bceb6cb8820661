"""Training imbalance by data-order position: records, statistics, figures and the monitor.

Knows nothing of merging. See :class:`PositionLossMonitor` for the callback,
:class:`ReplicaSchedule` for what a strategy training several replicas tells it, and
:mod:`lightning_selmerge.data.indexed` for the batch / per-sample-loss contract.
"""

from lightning_selmerge.imbalance.figure import plot_loss_by_position
from lightning_selmerge.imbalance.losses import (
    causal_lm_per_sample_loss,
    sequence_classification_per_sample_loss,
)
from lightning_selmerge.imbalance.monitor import PositionLossMonitor, ProbeResult, ProbeTarget
from lightning_selmerge.imbalance.probe import PositionProbe
from lightning_selmerge.imbalance.records import PositionRecords
from lightning_selmerge.imbalance.replicas import ReplicaSchedule
from lightning_selmerge.imbalance.stats import position_loss_spearman, segment_means

__all__ = [
    "PositionLossMonitor",
    "PositionProbe",
    "PositionRecords",
    "ProbeResult",
    "ProbeTarget",
    "ReplicaSchedule",
    "causal_lm_per_sample_loss",
    "plot_loss_by_position",
    "position_loss_spearman",
    "segment_means",
    "sequence_classification_per_sample_loss",
]
