"""Lightning glue: train K replicas on their own data orders (:class:`DataOrderEnsemble`) and
merge them each epoch (:class:`SelectionMergeCallback`), or train replica k of K as its own
fit (:class:`ReplicaJob`)."""

from .callback import SelectionMergeCallback
from .replica_job import ReplicaJob
from .replica_store import ReplicaState, ReplicaStore, cpu_state_copy
from .sampler import EnsembleBatchSampler
from .strategy import CHECKPOINT_KEY, DataOrderEnsemble

__all__ = [
    "CHECKPOINT_KEY",
    "DataOrderEnsemble",
    "EnsembleBatchSampler",
    "ReplicaJob",
    "ReplicaState",
    "ReplicaStore",
    "SelectionMergeCallback",
    "cpu_state_copy",
]
