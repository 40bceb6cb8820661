"""Per-thread buffers reused from chunk to chunk: a fresh allocation per chunk costs page faults.

A buffer is named by a tag, a dtype and a device and grows to the largest request seen on its
thread, so a tensor's short last chunk costs no new allocation. Results are views of it, valid
until the same thread asks for the same buffer again. The merge entry points run inside
:func:`scratch_scope`, which frees the thread's buffers when the outermost merge returns: a
merge's scratch (a few times ``chunk_numel`` elements, on the merge's device) does not outlive it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["held_buffer_bytes", "per_thread_buffer", "scratch_scope"]

_BUFFERS = threading.local()


def per_thread_buffer(
    tag: str, numel: int, dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    """The first ``numel`` elements of this thread's buffer ``(tag, dtype, device)``."""
    buffers = _BUFFERS.__dict__.setdefault("buffers", {})
    key = (tag, dtype, torch.device(device) if device is not None else None)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def held_buffer_bytes() -> int:
    """Bytes of scratch this thread holds (0 once its outermost :func:`scratch_scope` ended)."""
    buffers = _BUFFERS.__dict__.get("buffers", {})
    return sum(b.numel() * b.element_size() for b in buffers.values())


@contextmanager
def scratch_scope() -> Iterator[None]:
    """Reuse this thread's buffers inside; free them when the outermost scope exits."""
    state = _BUFFERS.__dict__
    state["depth"] = state.get("depth", 0) + 1
    try:
        yield
    finally:
        state["depth"] -= 1
        if state["depth"] == 0:
            state.pop("buffers", None)
