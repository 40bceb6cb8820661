"""lightning_selmerge: fine-tune K replicas on different data orders and merge them.

See the README for the quickstart. The merge core (:mod:`lightning_selmerge.merging`) is pure
torch and usable on its own; the Lightning parts are imported lazily, so ``import
lightning_selmerge`` for merging does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from .merging import (
    MergeError,
    MergeRule,
    ParameterSelection,
    WeightedAverage,
    merge_checkpoints,
    merge_state_dicts,
)

__version__ = "0.1.0"

_LAZY = {
    "DataOrderEnsemble": "lightning_selmerge.ensemble",
    "SelectionMergeCallback": "lightning_selmerge.ensemble",
    "DataOrderSampler": "lightning_selmerge.data",
    "IndexedDataset": "lightning_selmerge.data",
    "PositionLossMonitor": "lightning_selmerge.imbalance",
    "ReplicaJob": "lightning_selmerge.ensemble",
}

__all__ = [
    "DataOrderEnsemble",
    "DataOrderSampler",
    "IndexedDataset",
    "MergeError",
    "MergeRule",
    "ParameterSelection",
    "PositionLossMonitor",
    "ReplicaJob",
    "SelectionMergeCallback",
    "WeightedAverage",
    "__version__",
    "merge_checkpoints",
    "merge_state_dicts",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_selmerge' has no attribute {name!r}")
