"""The merge core: pure torch, no Lightning.

Methods over K aligned tensors, registered by name in :mod:`.methods` (:class:`WeightedAverage`,
:class:`ParameterSelection` with optional resample, :class:`TaskArithmetic`,
:class:`TiesMerging`, :class:`Dare`), a random source keyed by (seed, tensor name, element
offset), and drivers that follow one per-tensor :class:`~.plan.MergePlan`: whole state-dict
merge (:func:`merge_state_dicts`), out-of-core merge of safetensors checkpoints
(:func:`merge_checkpoints`) and the collective merge over ranks, all refusing replicas that hold
NaN/Inf unless told to drop them (:func:`find_nonfinite`, ``nonfinite="drop"``).
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
from .state_dict import iter_merged_chunks, merge_state_dicts, merge_tensor

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
    "TaskArithmetic",
    "TiesMerging",
    "WeightedAverage",
    "all_finite",
    "find_nonfinite",
    "iter_merged_chunks",
    "load_rules",
    "make_method",
    "merge_checkpoints",
    "merge_state_dicts",
    "merge_tensor",
    "method_for",
]
