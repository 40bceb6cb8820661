"""The merge core: pure torch, no Lightning.

Methods over K aligned tensors, registered by name in :mod:`.methods` (:class:`WeightedAverage`,
:class:`ParameterSelection` with optional resample, :class:`TaskArithmetic`,
:class:`TiesMerging`, :class:`Dare`), a random source keyed by (seed, tensor name, element
offset), and drivers that follow one per-tensor :class:`~.plan.MergePlan`: whole state-dict
merge (:func:`merge_state_dicts`), out-of-core merge of safetensors checkpoints
(:func:`merge_checkpoints`) and the collective merge over ranks, all refusing replicas that hold
NaN/Inf unless told to drop them (:func:`find_nonfinite`, ``nonfinite="drop"``).
The streaming merges (:func:`merge_state_dicts_streaming`, :func:`merge_checkpoints_streaming`,
:func:`merge_epoch`) read one replica at a time, with memory flat in K, and give the same bits.
"""

from .checkpoints import merge_checkpoints
from .errors import MergeError, NonFiniteError
from .finite import NonFinite, all_finite, find_nonfinite
from .keyed_random import KeyedRandom
from .methods import (
    ChunkContext,
    Dare,
    MergeMethod,
    ParameterSelection,
    TaskArithmetic,
    TiesMerging,
    WeightedAverage,
)
from .rules import MergeRule, load_rules, make_method, method_for
from .snapshot_records import find_epoch_snapshots
from .snapshots import merge_epoch
from .state_dict import merge_state_dicts
from .streaming import StreamingMerge, merge_state_dicts_streaming
from .streaming_files import merge_checkpoints_streaming
from .tensor_merge import iter_merged_chunks, merge_tensor

__all__ = [
    "ChunkContext",
    "Dare",
    "KeyedRandom",
    "MergeError",
    "MergeMethod",
    "MergeRule",
    "NonFinite",
    "NonFiniteError",
    "ParameterSelection",
    "StreamingMerge",
    "TaskArithmetic",
    "TiesMerging",
    "WeightedAverage",
    "all_finite",
    "find_epoch_snapshots",
    "find_nonfinite",
    "iter_merged_chunks",
    "load_rules",
    "make_method",
    "merge_checkpoints",
    "merge_checkpoints_streaming",
    "merge_epoch",
    "merge_state_dicts",
    "merge_state_dicts_streaming",
    "merge_tensor",
    "method_for",
]
