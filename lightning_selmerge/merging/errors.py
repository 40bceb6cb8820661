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


class AverageNotFinite(MergeError):
    """A streaming merge's output holds NaN/Inf in flat elements ``start:stop`` of tensor
    ``name``: some replica holds NaN/Inf there, or the finite sum overflowed the tensor's dtype.

    The streaming driver reads that range of each replica again to tell which."""

    def __init__(self, name: str, start: int, stop: int, method: object) -> None:
        super().__init__(
            f"tensor {name!r}: {method} is not finite near flat index {start}: a replica holds "
            "NaN/Inf, or the sum overflowed (cast the replicas to float64 before merging)"
        )
        self.name, self.start, self.stop, self.method = name, start, stop, method
