"""Tokenisation functions keyed by this package's code in ``datasets``' cache.

``Dataset.map`` caches its result (``~/.cache/huggingface/datasets``) under a key made of the
input and the function, but it hashes a function of an importable module by its name, not its
code: after an upgrade that changes how rows are tokenised, a rerun on the same files would load
the old tokenisation from the cache, silently. :func:`keyed_by_code` wraps the function with a
digest of the sources of :mod:`lightning_selmerge.hf`, which the key then includes.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KeyedByCode", "hf_code_digest", "keyed_by_code"]


@functools.cache
def hf_code_digest() -> str:
    """SHA-256 of the ``lightning_selmerge/hf`` sources (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class KeyedByCode:
    """``function`` with the digest ``code`` of the sources it runs, both in its pickled form
    (what ``datasets`` hashes into a ``map``'s cache key); calls go to ``function``.

    Example:
        >>> from datasets.fingerprint import Hasher
        >>> Hasher.hash(KeyedByCode(len, "v1")) == Hasher.hash(KeyedByCode(len, "v2"))
        False
        >>> KeyedByCode(len, "v1")("abc")
        3
    """

    function: Callable[..., Any]
    code: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def keyed_by_code(function: Callable[..., Any]) -> KeyedByCode:
    """``function`` keyed by :func:`hf_code_digest`, to pass to ``Dataset.map``."""
    return KeyedByCode(function, hf_code_digest())
