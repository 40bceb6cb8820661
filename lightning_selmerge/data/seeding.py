"""Stable seeds for data orders: a keyed hash, never Python's salted ``hash()``."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["stable_generator", "stable_seed"]


def stable_seed(*key: int | str) -> int:
    """Return a 63-bit seed derived from ``key`` by BLAKE2b; identical on every run and machine.

    Example:
        >>> stable_seed("order", 0, 1, 2) == stable_seed("order", 0, 1, 2)
        True
        >>> stable_seed("order", 0, 1, 2) != stable_seed("order", 0, 2, 1)
        True
    """
    text = "\x1f".join(f"{type(part).__name__}:{part}" for part in key)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stable_generator(*key: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stable_seed` of ``key``."""
    generator = torch.Generator()
    generator.manual_seed(stable_seed(*key))
    return generator
