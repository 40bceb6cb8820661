"""The random state of a replica's pass: seeded from (fit seed, ensemble seed, epoch, replica).

Shared by :class:`~lightning_selmerge.ensemble.DataOrderEnsemble` (K replicas in one fit) and
:class:`~lightning_selmerge.ensemble.ReplicaJob` (one replica per fit), so that replica k draws
the same dropout masks in both.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional for torch
    np = None  # type: ignore[assignment]

__all__ = ["rng_states", "seed_replica_pass", "set_rng_states"]


def rng_states() -> dict[str, Any]:
    """torch, python, numpy (and CUDA) RNG states, as values weights-only loading accepts."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:  # as torch and python values, which weights-only loading accepts
        name, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached]
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states and np is not None:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy(), int(pos), int(has_gauss), float(cached)))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_replica_pass(base: int, seed: int, epoch: int, replica: int) -> None:
    """Seed torch, python and numpy for one replica's pass over one epoch.

    Each pass's random stream (dropout, augmentation) then depends only on (base, seed, epoch,
    replica): not on what ran before it (validation, other replicas), on which rank trains the
    replica, on whether the fit was resumed in between, or on whether the replica trains inside
    an ensemble or as its own job. ``base`` is the fit's seed (``torch.initial_seed()`` at fit
    start, i.e. ``seed_everything``'s), ``seed`` the ensemble's data-order seed.

    Example:
        >>> seed_replica_pass(0, 0, 1, 2); a = torch.rand(2)
        >>> seed_replica_pass(0, 0, 1, 2); torch.equal(a, torch.rand(2))
        True
    """
    key = f"selmerge-replica-pass:{base}:{seed}:{epoch}:{replica}".encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    torch.manual_seed(value)  # also every CUDA device
    random.seed(value)
    if np is not None:
        np.random.seed(value % 2**32)
