"""Checks that K inputs line up (names, shapes, dtypes), and the copy of the tensors that are
never merged (integer, bool, complex: they must agree bit for bit)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import MergeError

__all__ = [
    "check_aligned",
    "check_same_names",
    "copied_tensor_differs",
    "copy_exact",
    "same_bits",
]


def check_aligned(name: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """Same shape and dtype everywhere, or a :class:`MergeError` naming the tensor and the input."""
    first = tensors[0]
    for label, tensor in zip(labels[1:], tensors[1:]):
        if tensor.shape != first.shape:
            raise MergeError(
                f"tensor {name!r}: shape {tuple(tensor.shape)} in {label} but "
                f"{tuple(first.shape)} in {labels[0]}: the inputs must be the same architecture"
            )
        if tensor.dtype != first.dtype:
            raise MergeError(
                f"tensor {name!r}: dtype {tensor.dtype} in {label} but {first.dtype} in "
                f"{labels[0]}: cast the checkpoints to one dtype before merging"
            )


def check_same_names(names: Sequence[set[str]], labels: Sequence[str]) -> None:
    """Every input has the same tensor names, or a :class:`MergeError` listing the difference."""
    for label, other in zip(labels[1:], names[1:]):
        missing, extra = sorted(names[0] - other), sorted(other - names[0])
        if missing or extra:
            raise MergeError(
                f"{label} does not have the same tensors as {labels[0]}: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, extra "
                f"{extra[:5]}{'...' if len(extra) > 5 else ''}"
            )


def copy_exact(name: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> torch.Tensor:
    """Integer, bool and complex tensors are never merged: they must agree, bit for bit, and
    replica 0's is kept."""
    for label, tensor in zip(labels[1:], tensors[1:]):
        if not same_bits(tensor, tensors[0]):
            raise copied_tensor_differs(name, tensors[0].dtype, labels[0], label)
    return tensors[0].clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bytes (``torch.equal`` has no complex32 kernel)."""
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def copied_tensor_differs(name: str, dtype: torch.dtype, first: str, other: str) -> MergeError:
    """The error for a tensor that is copied, not merged, and differs between two replicas."""
    return MergeError(
        f"non-float tensor {name!r} ({dtype}) differs between {first} and {other}: integer, "
        "bool and complex tensors (buffers such as step counts or rotary tables) are copied, "
        "never merged, so they must be equal"
    )
