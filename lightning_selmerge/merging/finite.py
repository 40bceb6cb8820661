"""NaN/Inf in replicas: detect them, name the replica and tensor, or drop those replicas.

A diverged replica (a NaN or an Inf in any floating-point tensor) must not be merged: selection
would copy some of its elements into the merge and an average would spread them everywhere. The
merge functions take ``nonfinite="error"`` (the default: raise :class:`NonFiniteError`) or
``nonfinite="drop"`` (merge the other replicas, dropping the matching per-replica weights or
probabilities; see :meth:`MergeMethod.subset <lightning_selmerge.merging.MergeMethod.subset>`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .errors import MergeError, NonFiniteError
from .ties import storage_key

__all__ = [
    "NonFinite",
    "all_finite",
    "check_finite",
    "check_nonfinite_mode",
    "find_nonfinite",
    "surviving_replicas",
]

#: What a merge does with a replica holding NaN or Inf: refuse (``"error"``) or leave it out.
NonFinite = Literal["error", "drop"]

DROP_HINT = (
    "a diverged replica must not be merged: leave it out with nonfinite='drop' "
    "(CLI: --drop_nonfinite), or fix its training (lower learning rate, gradient clipping)"
)


def check_nonfinite_mode(nonfinite: str) -> None:
    if nonfinite not in ("error", "drop"):
        raise MergeError(f"nonfinite must be 'error' or 'drop', got {nonfinite!r}")


#: the 1-byte float whose range float16 does not hold (an exponent alone: 2**-127 .. 2**127)
_E8M0 = getattr(torch, "float8_e8m0fnu", None)


def _comparable(tensor: torch.Tensor) -> torch.Tensor:
    # float8 has no reduction/isfinite kernels on CPU; float16 holds the values of the others
    # exactly, float32 those of e8m0
    if tensor.element_size() != 1:
        return tensor
    return tensor.to(torch.float32 if tensor.dtype == _E8M0 else torch.float16)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN and no +-Inf (always true for integer and bool tensors).

    A NaN or an infinity makes the sum non-finite, so a finite sum (one fast read pass, no
    temporary) settles it; only a non-finite sum (a bad element, or an overflow of the sum) takes
    the exact test: the maximum and minimum are finite (``max`` propagates NaN).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    values = _comparable(tensor)
    if bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values.max())) and bool(torch.isfinite(values.min()))


def check_base_finite(name: str, base: torch.Tensor | None, start: int = 0) -> None:
    """Refuse a base (pre-trained) tensor holding NaN/Inf where a method computes with it.

    Example:
        >>> check_base_finite("w", torch.tensor([1.0, float("nan")]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_selmerge.merging.errors.MergeError: tensor 'w': the base holds NaN or Inf (flat...
    """
    if base is None or all_finite(base):
        return
    where = int((~torch.isfinite(base.reshape(-1))).nonzero()[0]) + start
    raise MergeError(
        f"tensor {name!r}: the base holds NaN or Inf (flat index {where}): task vectors "
        "(replica - base) would carry it into the merge; give a finite base checkpoint"
    )


def check_finite(
    name: str,
    tensors: Sequence[torch.Tensor],
    labels: Sequence[str],
    start: int = 0,
    indices: Sequence[int] | None = None,
) -> None:
    """Raise :class:`NonFiniteError` naming every input among ``tensors`` that holds NaN/Inf.

    ``tensors`` are aligned flat pieces of tensor ``name`` whose first element sits at flat offset
    ``start``; ``labels`` name the inputs ("replica 2", "replica 2 (path)") and ``indices`` give
    their replica indices for :attr:`NonFiniteError.replicas` (default ``0..K-1``).
    """
    bad = [k for k, tensor in enumerate(tensors) if not all_finite(tensor)]
    if not bad:
        return
    where = []
    for k in bad:
        flags = ~torch.isfinite(_comparable(tensors[k]).reshape(-1))
        first = int(flags.nonzero()[0, 0]) + start
        kinds = _kinds(tensors[k].reshape(-1)[flags])
        where.append(f"{labels[k]} ({kinds}, first at flat index {first})")
    raise NonFiniteError(
        f"tensor {name!r} holds non-finite values in {' and '.join(where)}: {DROP_HINT}",
        tensor=name,
        replicas=[k if indices is None else indices[k] for k in bad],
    )


def _kinds(values: torch.Tensor) -> str:
    values = _comparable(values)
    found = [
        kind
        for kind, present in (
            ("NaN", bool(values.isnan().any())),
            ("+Inf", bool((values == float("inf")).any())),
            ("-Inf", bool((values == float("-inf")).any())),
        )
        if present
    ]
    return "/".join(found)


def find_nonfinite(replicas: Sequence[Mapping[str, torch.Tensor]]) -> dict[int, str]:
    """Replica index -> name of its first floating-point tensor holding NaN or Inf.

    Replicas without any are left out, so an empty dict means every replica is finite.

    Example:
        >>> import torch
        >>> ok, bad = {"w": torch.zeros(3)}, {"w": torch.tensor([0.0, float("nan"), 0.0])}
        >>> find_nonfinite([ok, bad, ok])
        {1: 'w'}
    """
    found: dict[int, str] = {}
    for index, replica in enumerate(replicas):
        seen: set[tuple] = set()
        for name, tensor in replica.items():
            key = storage_key(tensor)
            if key in seen:  # tied weights: checked once
                continue
            seen.add(key)
            if not all_finite(tensor):
                found[index] = name
                break
    return found


def surviving_replicas(bad: Mapping[int, str], labels: Sequence[str]) -> list[int]:
    """Indices of the replicas left after dropping ``bad`` (warns naming the dropped ones).

    Raises :class:`MergeError` when fewer than two remain.
    """
    keep = [k for k in range(len(labels)) if k not in bad]
    dropped = ", ".join(f"{labels[k]} (NaN/Inf in tensor {name!r})" for k, name in bad.items())
    if len(keep) < 2:
        raise MergeError(
            f"nonfinite='drop' leaves {len(keep)} replica(s) of {len(labels)}: {dropped} hold "
            "NaN/Inf, and merging needs at least 2 finite replicas; fix the training of the "
            "diverged replicas (lower learning rate, gradient clipping) and merge again"
        )
    warnings.warn(f"merging {len(keep)} of {len(labels)} replicas: dropped {dropped}", stacklevel=3)
    return keep
