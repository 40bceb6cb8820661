"""Lightning glue: train K replicas on their own data orders (:class:`DataOrderEnsemble`) and
merge them each epoch (:class:`SelectionMergeCallback`)."""

from .callback import SelectionMergeCallback
from .replica_store import ReplicaState, ReplicaStore, cpu_state_copy
from .sampler import EnsembleBatchSampler
from .strategy import CHECKPOINT_KEY, DataOrderEnsemble

__all__ = [
    "CHECKPOINT_KEY",
    "DataOrderEnsemble",
    "EnsembleBatchSampler",
    "ReplicaState",
    "ReplicaStore",
    "SelectionMergeCallback",
    "cpu_state_copy",
]
