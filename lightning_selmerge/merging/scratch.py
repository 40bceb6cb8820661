"""Per-thread buffers reused from chunk to chunk: a fresh allocation per chunk costs page faults.

A buffer is named by a tag, a dtype and a device, grows to the largest request seen on its thread
and never shrinks, so a tensor's short last chunk costs no new allocation. Results are views of
it, valid until the same thread asks for the same buffer again.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["per_thread_buffer"]

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
