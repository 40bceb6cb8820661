"""Merge one floating-point tensor of K replicas, chunk by chunk: the loop every merge path runs.

Each chunk takes the fused kernel where one covers it (:mod:`~.kernels.dispatch`), else the
method's torch kernel, with its :class:`~.methods.ChunkContext` (the draws keyed by the tensor's
name and the chunk's offset, so chunking never changes the bits) and the NaN/Inf checks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import MergeError, overflow_fix
from .finite import all_finite, check_base_finite, check_finite
from .kernels.dispatch import fused_merge_chunk
from .keyed_random import KeyedRandom
from .methods import ChunkContext, MergeMethod
from .plan import prepare_tensor
from .scratch import scratch_scope

__all__ = ["DEFAULT_CHUNK_NUMEL", "iter_merged_chunks", "merge_tensor"]

#: Elements merged at once; bounds the extra memory to a few times this many elements.
DEFAULT_CHUNK_NUMEL = 1 << 20


def iter_merged_chunks(
    name: str,
    replicas: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    method: MergeMethod,
    rng: KeyedRandom,
    *,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    offset: int = 0,
    check_finite_as: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    reuse_buffer: bool = False,
    prepared: Any = None,
) -> Iterator[torch.Tensor]:
    """Merged flat chunks of one floating-point tensor, in order.

    ``offset`` is the flat position of the first element within the whole tensor (non-zero when
    the tensors are one rank's shard of it), so the random draws stay those of the whole tensor.

    Where the chunks go: into ``out`` (a tensor of the replicas' numel and dtype) at their own
    offsets, the yielded chunks being views of it; or, with ``reuse_buffer=True``, into one
    buffer reused for every chunk, so that a yielded chunk is valid only until the next one is
    requested (no allocation per chunk; for consumers that write each chunk out at once). By
    default each chunk is a new tensor.

    With ``check_finite_as`` (one label per replica, e.g. ``"replica 2"``) every chunk is checked
    for NaN/Inf in the same pass and :class:`NonFiniteError` names the replica, the tensor and the
    element; ``indices`` are the replicas' indices it reports (default ``0..K-1``). A method that
    :attr:`~MergeMethod.propagates_nonfinite` has only its output chunk checked (the inputs
    only when that is not finite); a task-vector method's output is checked too, for overflow.

    ``prepared``: what :func:`~.plan.prepare_tensor` computed from the whole tensor, for a
    method that :attr:`~MergeMethod.needs_whole_tensor`; computed here from ``replicas`` when
    they are the whole tensor (``offset`` 0), required otherwise.
    """
    if chunk_numel < 1:
        raise MergeError(f"chunk_numel must be >= 1, got {chunk_numel}")
    flat = [r.reshape(-1) for r in replicas]
    flat_base = base.reshape(-1) if base is not None else None
    if prepared is None and method.needs_whole_tensor:
        if offset != 0:
            raise MergeError(
                f"tensor {name!r}: {method} needs statistics of the whole tensor: pass "
                "prepared=prepare_tensor(...) of the whole tensor with a slice's offset"
            )
        prepared = prepare_tensor(method, name, flat, flat_base, chunk_numel)
    numel = flat[0].numel()
    flat_out = _flat_output(name, out, flat[0]) if out is not None else None
    buffer = None
    if reuse_buffer and flat_out is None:
        buffer = torch.empty(min(chunk_numel, numel), dtype=flat[0].dtype, device=flat[0].device)
    labels = check_finite_as
    for begin in range(0, numel, chunk_numel):
        end = min(begin + chunk_numel, numel)
        parts = [f[begin:end] for f in flat]
        if flat_out is not None:
            target = flat_out[begin:end]
        else:
            target = buffer[: end - begin] if buffer is not None else None
        ctx = ChunkContext(rng, name, offset + begin, prepared)
        base_part = flat_base[begin:end] if flat_base is not None else None
        if labels is not None and method.computes_with_base:
            check_base_finite(name, base_part, offset + begin)
        fused = torch.empty_like(parts[0]) if target is None else target
        finite = fused_merge_chunk(method, ctx, parts, base_part, fused)
        if finite is not None:  # one fused pass merged the chunk and looked for NaN/Inf
            merged = fused
            if labels is not None and not finite:
                check_finite(name, parts, labels, offset + begin, indices)
                _overflowed(name, method, merged, offset + begin)
            yield merged
            continue
        if labels is not None and not method.propagates_nonfinite:
            check_finite(name, parts, labels, offset + begin, indices)
        merged = method.merge_chunk(ctx, parts, base_part, target)
        # a task-vector method can overflow finite inputs (scaled sums); a selection cannot
        may_overflow = method.propagates_nonfinite or method.computes_with_base
        if labels is not None and may_overflow and not all_finite(merged):
            check_finite(name, parts, labels, offset + begin, indices)
            _overflowed(name, method, merged, offset + begin)
        yield merged


def _overflowed(name: str, method: MergeMethod, merged: torch.Tensor, near: int) -> None:
    raise MergeError(
        f"tensor {name!r}: {method} of finite replicas overflowed {merged.dtype} near "
        f"flat index {near}: {overflow_fix(merged.dtype, method)}"
    )


def _flat_output(name: str, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if out.numel() != like.numel() or out.dtype != like.dtype or not out.is_contiguous():
        raise MergeError(
            f"tensor {name!r}: out must be a contiguous {like.dtype} tensor of {like.numel()} "
            f"elements, got {out.dtype} of {out.numel()}"
        )
    return out.view(-1)


def merge_tensor(
    name: str,
    replicas: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    method: MergeMethod,
    rng: KeyedRandom,
    *,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    check_finite_as: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Merge one floating-point tensor; the result is a new contiguous tensor.

    ``check_finite_as`` and ``indices``: as in :func:`iter_merged_chunks`.
    """
    out = torch.empty(replicas[0].shape, dtype=replicas[0].dtype, device=replicas[0].device)
    chunks = iter_merged_chunks(
        name,
        replicas,
        base,
        method,
        rng,
        chunk_numel=chunk_numel,
        check_finite_as=check_finite_as,
        indices=indices,
        out=out,
    )
    with scratch_scope():
        for _ in chunks:  # each chunk is merged straight into its place in ``out``
            pass
    return out
