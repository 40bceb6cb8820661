"""Merge whole state dicts held in memory, tensor by tensor and chunk by chunk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .alignment import check_aligned, check_same_names, copy_exact
from .device_stream import merge_through_device
from .finite import NonFinite, find_nonfinite
from .kernels.dispatch import floating_bytes, merge_size
from .methods import MergeMethod
from .plan import MergePlan, checked_tie_groups, merge_dropping_nonfinite
from .rules import MergeRule
from .scratch import scratch_scope
from .tensor_merge import DEFAULT_CHUNK_NUMEL, merge_tensor

__all__ = ["merge_state_dicts"]


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
