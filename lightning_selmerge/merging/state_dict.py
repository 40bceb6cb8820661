"""Merge whole state dicts held in memory, tensor by tensor and chunk by chunk."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .errors import MergeError, overflow_fix
from .finite import NonFinite, all_finite, check_base_finite, check_finite, find_nonfinite
from .kernels.dispatch import floating_bytes, fused_merge_chunk, merge_size
from .keyed_random import KeyedRandom
from .methods import ChunkContext, MergeMethod
from .plan import (
    MergePlan,
    checked_tie_groups,
    merge_dropping_nonfinite,
    prepare_tensor,
)
from .rules import MergeRule
from .scratch import scratch_scope

__all__ = ["DEFAULT_CHUNK_NUMEL", "iter_merged_chunks", "merge_state_dicts", "merge_tensor"]

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


def merge_state_dicts(
    replicas: Sequence[Mapping[str, torch.Tensor]],
    *,
    method: MergeMethod | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    rules: Sequence[MergeRule] = (),
    seed: int = 0,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    nonfinite: NonFinite = "error",
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge K aligned state dicts into one.

    Floating-point tensors are merged by ``method`` (default: uniform parameter selection) or by
    the first of ``rules`` whose pattern matches the name; integer and bool tensors are copied
    from replica 0 after checking that all replicas agree. Tensors that share storage (tied
    weights) are merged once and stay tied in the output. Random draws are keyed by ``seed``, the
    tensor's name and each element's offset, so the result does not depend on ``chunk_numel``
    or the order of the keys.

    Args:
        replicas: K >= 2 state dicts with the same keys, shapes and dtypes.
        method: the default method; :class:`ParameterSelection` if ``None``.
        base: the pre-trained state dict, needed by selection with ``resample > 0``.
        rules: per-tensor overrides, first match wins.
        seed: the random seed of selection.
        chunk_numel: elements merged at once (bounds the extra memory).
        nonfinite: a replica with NaN/Inf in a floating-point tensor raises
            :class:`NonFiniteError` naming the replica and the tensor (``"error"``), or is left
            out with a warning (``"drop"``): the others are merged as if they were the only
            inputs, the method and rules keep the remaining replicas' weights or probabilities
            (renormalised, see :meth:`MergeMethod.subset`), and fewer than 2 remaining replicas
            is a :class:`MergeError`. The check is done in the merge's own pass.
        device: where the merge runs and its tensors end up. ``None`` (the default): where the
            replicas are. Else the replicas' chunks are streamed to ``device`` through reusable
            staging buffers, copies overlapped with the merge
            (:mod:`~lightning_selmerge.merging.device_stream`), for the tensors whose method
            gives the same bits there (:func:`~.device_stream.exact_on`); the others are merged
            where the replicas are and copied to ``device``. The result is the same bits.

    Example:
        >>> import torch
        >>> from lightning_selmerge.merging import ParameterSelection
        >>> base = {"w": torch.zeros(6)}
        >>> replicas = [{"w": torch.tensor([1., 0, 0, 0, 0, 0])}, {"w": torch.zeros(6)}]
        >>> merge_state_dicts(replicas, base=base, method=ParameterSelection(resample=8))["w"][0]
        tensor(1.)
    """
    labels = [f"replica {k}" for k in range(len(replicas))]
    plan = MergePlan.create(method, rules, seed, len(replicas))

    def attempt(plan: MergePlan, keep: Sequence[int]) -> dict[str, torch.Tensor]:
        kept, kept_labels = [replicas[k] for k in keep], [labels[k] for k in keep]
        with merge_size(sum(floating_bytes(replica.values()) for replica in kept)):
            if device is None:
                return _merge_state_dicts(kept, kept_labels, keep, plan, base, chunk_numel)
            from .device_stream import merge_through_device  # it builds on this module

            return merge_through_device(
                kept, kept_labels, keep, plan, base, device=device, chunk_numel=chunk_numel
            )

    with scratch_scope():
        return merge_dropping_nonfinite(
            plan,
            attempt,
            nonfinite=nonfinite,
            labels=labels,
            find_bad=lambda: find_nonfinite(replicas),
        )


def _merge_state_dicts(
    replicas: Sequence[Mapping[str, torch.Tensor]],
    labels: Sequence[str],
    indices: Sequence[int],
    plan: MergePlan,
    base: Mapping[str, torch.Tensor] | None,
    chunk_numel: int,
) -> dict[str, torch.Tensor]:
    check_same_names([set(r) for r in replicas], labels)
    merged: dict[str, torch.Tensor] = {}
    for key_name, names in checked_tie_groups(replicas, labels):
        tensors = [r[key_name].detach() for r in replicas]  # parameters: no autograd graph
        check_aligned(key_name, tensors, labels)
        if not tensors[0].is_floating_point():
            result = copy_exact(key_name, tensors, labels)
        else:
            base_tensor = plan.base_for(key_name, base, "base=<pre-trained state dict>")
            if base_tensor is not None:
                base_tensor = base_tensor.detach()
                check_aligned(key_name, [tensors[0], base_tensor], [labels[0], "base"])
            result = merge_tensor(
                key_name,
                tensors,
                base_tensor,
                plan.method_for(key_name),
                plan.rng,
                chunk_numel=chunk_numel,
                check_finite_as=labels,
                indices=indices,
            )
        for name in names:
            merged[name] = result
    return {name: merged[name] for name in replicas[0]}
