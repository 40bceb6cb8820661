"""Merge methods over K aligned 1-D chunks of one tensor, registered by name.

One file per method (:mod:`.average`, :mod:`.selection`, ...), each a frozen dataclass whose
fields are its parameters, registered with :func:`register_method`; :func:`build_method` makes
one from its name and parameters (what the CLI, the YAML rules and the callback's string
shortcuts do). Every method has a fast kernel (:meth:`MergeMethod.merge_chunk`) and a plain
reference (:meth:`MergeMethod.reference`) that defines its result.

Example:
    >>> from lightning_selmerge.merging.methods import build_method, method_names
    >>> {"average", "selection", "task_arithmetic", "ties", "dare"} <= set(method_names())
    True
    >>> build_method("average", {"weights": [1, 3]})
    WeightedAverage(weights=[1, 3])
"""

# Importing a method's module registers it.
from .average import WeightedAverage
from .base import (
    ChunkContext,
    MergeMethod,
    MethodParameter,
    ReplicaAccumulator,
    StreamingForm,
    StreamTensor,
)
from .dare import Dare
from .registry import build_method, method_class, method_names, register_method
from .selection import MAX_RESAMPLE, ParameterSelection, candidates_at
from .selection_kernel import bit_view, moved_bits
from .task_arithmetic import TaskArithmetic
from .ties_merge import TiesMerging

__all__ = [
    "MAX_RESAMPLE",
    "ChunkContext",
    "Dare",
    "MergeMethod",
    "MethodParameter",
    "ParameterSelection",
    "ReplicaAccumulator",
    "StreamTensor",
    "StreamingForm",
    "TaskArithmetic",
    "TiesMerging",
    "WeightedAverage",
    "bit_view",
    "build_method",
    "candidates_at",
    "method_class",
    "method_names",
    "moved_bits",
    "register_method",
]
