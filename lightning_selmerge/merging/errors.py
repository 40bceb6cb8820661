"""The error types of the merge core."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class MergeError(ValueError):
    """Bad merge input: the message names the tensor or replica at fault and how to fix it."""


class NonFiniteError(MergeError):
    """A replica holds NaN or Inf in a floating-point tensor.

    Attributes:
        tensor: the name of the tensor where it was found.
        replicas: the indices (in the merge's input order) of the replicas at fault there.
    """

    def __init__(self, message: str, tensor: str, replicas: Sequence[int]) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.replicas = tuple(replicas)


class AverageNotFinite(MergeError):
    """A streaming merge's output holds NaN/Inf in flat elements ``start:stop`` of tensor
    ``name``: some replica holds NaN/Inf there, or the finite sum overflowed the tensor's dtype.

    The streaming driver reads that range of each replica again to tell which."""

    def __init__(self, name: str, start: int, stop: int, method: object) -> None:
        super().__init__(
            f"tensor {name!r}: {method} is not finite near flat index {start}: a replica holds "
            "NaN/Inf, or the result overflowed its dtype"
        )
        self.name, self.start, self.stop, self.method = name, start, stop, method


def overflow_fix(dtype: torch.dtype, method: object = None) -> str:
    """How to merge finite replicas whose merge by ``method`` overflowed ``dtype``.

    >>> overflow_fix(torch.float16)
    'cast the replicas to float32 (or bfloat16) before merging'
    """
    wider = "float32 (or bfloat16)" if dtype == torch.float16 else "float64"
    scaled = getattr(method, "computes_with_base", False)
    return f"cast the replicas to {wider} before merging" + (
        ", or lower the method's scale" if scaled else ""
    )
