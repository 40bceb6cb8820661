"""Lightning glue: train K replicas on their own data orders (:class:`DataOrderEnsemble`) and
merge them each epoch (:class:`SelectionMergeCallback`)."""

from .callback import SelectionMergeCallback
from .sampler import EnsembleBatchSampler
from .strategy import DataOrderEnsemble, ReplicaState, cpu_state_copy

__all__ = [
    "DataOrderEnsemble",
    "EnsembleBatchSampler",
    "ReplicaState",
    "SelectionMergeCallback",
    "cpu_state_copy",
]
