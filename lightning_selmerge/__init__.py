"""lightning_selmerge: fine-tune K replicas on different data orders and merge them.

See the README for the quickstart. The merge core (:mod:`lightning_selmerge.merging`) is pure
torch and usable on its own.
"""

from .merging import (
    MergeError,
    MergeRule,
    ParameterSelection,
    WeightedAverage,
    merge_checkpoints,
    merge_state_dicts,
)

__version__ = "0.1.0"

__all__ = [
    "MergeError",
    "MergeRule",
    "ParameterSelection",
    "WeightedAverage",
    "__version__",
    "merge_checkpoints",
    "merge_state_dicts",
]
