"""Tied tensors: state-dict entries that view the same memory are one tensor to merge or check."""

from __future__ import annotations

import torch

__all__ = ["storage_key"]


def storage_key(tensor: torch.Tensor) -> tuple:
    """Identifies the memory a tensor views: equal keys mean tied tensors.

    Two views that merely start at the same address (``w`` and ``w[:1]``) get different keys.
    """
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )
