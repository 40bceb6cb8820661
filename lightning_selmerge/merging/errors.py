"""The error types of the merge core."""

from __future__ import annotations

from collections.abc import Sequence


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
