"""TIES' trim: keep the ``k`` largest-magnitude elements of a replica's whole task vector.

``k = max(1, int(density * numel))``, as mergekit's ``magnitude`` sparsification. Equal
magnitudes at the cut are kept lowest flat index first, so exactly ``k`` elements are kept and
the choice is defined whatever the chunking. The cut is computed once per tensor and replica
(:func:`magnitude_cut`) reading ``chunk_numel`` elements at a time (a radix select over the
magnitudes' bit patterns: memory bounded by the chunk, not the tensor), then applied to each
chunk (:func:`kept`). :func:`reference_kept` defines the same set by a sort of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .base import compute_dtype

__all__ = ["MagnitudeCut", "kept", "magnitude_cut", "reference_kept", "trim_count"]

_DIGIT = 16
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class MagnitudeCut:
    """Element ``i`` is kept when its magnitude's key exceeds ``key``, or equals it and
    ``i <= last_tie``. ``key = -1`` keeps everything."""

    key: int
    last_tie: int


KEEP_ALL = MagnitudeCut(-1, -1)


def trim_count(density: float, numel: int) -> int:
    """How many elements the trim keeps: ``max(1, int(density * numel))`` (0 when empty)."""
    return 0 if numel == 0 else min(numel, max(1, int(density * numel)))


def magnitude_keys(replica: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|replica - base|`` in the compute dtype, as same-width integers (order-preserving for
    non-negative floats)."""
    compute = compute_dtype(base)
    delta = replica.to(compute) - base.to(compute)
    return delta.abs_().view(_INT_OF[compute])


def _chunks(
    replica: torch.Tensor, base: torch.Tensor, chunk_numel: int
) -> Iterator[tuple[int, torch.Tensor]]:
    for begin in range(0, replica.numel(), chunk_numel):
        end = min(begin + chunk_numel, replica.numel())
        yield begin, magnitude_keys(replica[begin:end], base[begin:end])


def magnitude_cut(
    replica: torch.Tensor, base: torch.Tensor, density: float, chunk_numel: int
) -> MagnitudeCut:
    """The cut keeping the :func:`trim_count` largest magnitudes of flat ``replica - base``."""
    numel = replica.numel()
    keep = trim_count(density, numel)
    if keep >= numel:
        return KEEP_ALL
    width = torch.finfo(compute_dtype(base)).bits
    prefix, rank = 0, keep  # the key's digits found so far; its rank among what matches them
    for level in range(width // _DIGIT):
        shift = width - _DIGIT * (level + 1)
        histogram = torch.zeros(1 << _DIGIT, dtype=torch.int64)
        for _, keys in _chunks(replica, base, chunk_numel):
            if level > 0:
                keys = keys[(keys >> (shift + _DIGIT)) == prefix]
            digits = ((keys >> shift) & ((1 << _DIGIT) - 1)).long()
            histogram += torch.bincount(digits, minlength=1 << _DIGIT).cpu()
        from_top = histogram.flip(0).cumsum(0)
        position = int(torch.searchsorted(from_top, rank))  # first from the top reaching rank
        digit = (1 << _DIGIT) - 1 - position
        rank -= int(from_top[position]) - int(histogram[digit])
        prefix = (prefix << _DIGIT) | digit
    seen = 0  # ties (key == prefix) before the chunk; keep the first ``rank`` of them
    for begin, keys in _chunks(replica, base, chunk_numel):
        ties = (keys == prefix).nonzero().squeeze(1)
        if seen + ties.numel() >= rank:
            return MagnitudeCut(prefix, begin + int(ties[rank - seen - 1]))
        seen += ties.numel()
    raise AssertionError("the radix select's key has fewer ties than counted")


def kept(
    cut: MagnitudeCut, replica: torch.Tensor, base: torch.Tensor, start: int
) -> torch.Tensor | None:
    """Bool mask of a chunk's kept elements (the chunk starts at flat ``start``); ``None``
    when all are kept."""
    if cut.key < 0:
        return None
    keys = magnitude_keys(replica, base)
    mask = keys > cut.key
    if start <= cut.last_tie:
        positions = torch.arange(start, start + keys.numel(), device=keys.device)
        mask |= (keys == cut.key) & (positions <= cut.last_tie)
    return mask


def reference_kept(replica: torch.Tensor, base: torch.Tensor, density: float) -> torch.Tensor:
    """The trim's kept set, plainly: the first :func:`trim_count` elements of a stable sort of
    the flat magnitudes from the largest down."""
    keys = magnitude_keys(replica.reshape(-1), base.reshape(-1))
    order = torch.sort(keys, descending=True, stable=True).indices
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[order[: trim_count(density, keys.numel())]] = True
    return mask.view(replica.shape)
