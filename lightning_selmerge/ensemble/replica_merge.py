"""The ensemble's merge of its replicas: in memory on one device, a collective over the replica
groups on several ranks.

On one device whose module lives on an accelerator, the in-memory merge streams the host-held
replicas through it (:mod:`lightning_selmerge.merging.device_stream`) and returns the merged
tensors there; methods whose arithmetic there may round differently from the CPU's stay on the
CPU (their results are copied over), so the bits are the CPU merge's either way.

Frozen parameters (the tensors the replicas share) are the same in every replica: they are
taken as they are, not merged; the merge keeps the initial state's tensor order.

Example:
    >>> import torch
    >>> from lightning_selmerge.merging import WeightedAverage
    >>> initial = {"w": torch.zeros(2), "frozen": torch.ones(1)}
    >>> replicas = [{"w": torch.tensor([1.0, 2.0]), "frozen": initial["frozen"]},
    ...             {"w": torch.tensor([3.0, 4.0]), "frozen": initial["frozen"]}]
    >>> merged = merge_in_memory(replicas, initial, {"frozen": initial["frozen"]},
    ...                          WeightedAverage(), rules=(), seed=0, nonfinite="error")
    >>> merged["w"].tolist(), list(merged)
    ([2.0, 3.0], ['w', 'frozen'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_selmerge.merging import (
    MergeMethod,
    MergeRule,
    NonFinite,
    NonFiniteError,
    find_nonfinite,
    merge_state_dicts,
)
from lightning_selmerge.merging.collective import merge_state_dicts_collective
from lightning_selmerge.merging.device_stream import DEVICE_CHUNK_NUMEL

__all__ = ["merge_in_memory", "merge_over_groups", "refuse_nonfinite"]

State = Mapping[str, torch.Tensor]


def _trained(state: State, shared: State) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in state.items() if name not in shared}


def _with_shared(merged: State, shared: State, order: list[str]) -> dict[str, torch.Tensor]:
    return {name: shared[name] if name in shared else merged[name] for name in order}


def merge_in_memory(
    replicas: Sequence[State],
    initial: State,
    shared: State,
    method: MergeMethod,
    rules: Sequence[MergeRule],
    seed: int,
    nonfinite: NonFinite,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Merge the K replicas' module states of one device (``initial`` is the base).

    ``device``: an accelerator to merge on (the trained tensors of the result live there; the
    ``shared`` ones are returned as they are); ``None`` or the CPU: merged where the states are.
    """
    on_device = device is not None and device.type != "cpu"
    merged = merge_state_dicts(
        [_trained(state, shared) for state in replicas],
        base=_trained(initial, shared),
        method=method,
        rules=rules,
        seed=seed,
        nonfinite=nonfinite,
        **({"device": device, "chunk_numel": DEVICE_CHUNK_NUMEL} if on_device else {}),
    )
    return _with_shared(merged, shared, list(initial))


def merge_over_groups(
    local: Mapping[int, State],
    initial: State,
    shared: State,
    method: MergeMethod,
    rules: Sequence[MergeRule],
    seed: int,
    nonfinite: NonFinite,
    *,
    num_replicas: int,
    group: Any,
    offsets: Mapping[str, int],
    device: torch.device | None,
) -> dict[str, torch.Tensor]:
    """The collective merge over the replica dimension (``group``), from this rank's replicas
    ``local`` (``{replica: module state}``, local slices); this rank's slice of the merge."""
    trained = {k: _trained(state, shared) for k, state in local.items()}
    refuse_nonfinite(trained, nonfinite)
    merged = merge_state_dicts_collective(
        trained,
        num_replicas=num_replicas,
        group=group,
        offsets=dict(offsets),
        method=method,
        base=_trained(initial, shared),
        rules=rules,
        seed=seed,
        device=device,
    )
    return _with_shared(merged, shared, list(initial))


def refuse_nonfinite(local: Mapping[int, State], nonfinite: NonFinite) -> None:
    """On several ranks: every rank learns which replicas hold NaN/Inf, and all refuse."""
    indices = sorted(local)
    found = {indices[i]: name for i, name in find_nonfinite([local[k] for k in indices]).items()}
    everyone: list[dict[int, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, found)
    bad = {k: name for part in everyone for k, name in (part or {}).items()}
    if not bad:
        return
    first = min(bad)
    advice = (
        "dropping replicas (nonfinite='drop') works on one device only; lower the learning "
        "rate or clip gradients, and resume from a checkpoint before the divergence"
        if nonfinite == "drop"
        else "lower the learning rate or clip gradients, and resume from a checkpoint"
    )
    raise NonFiniteError(
        f"replica(s) {sorted(bad)} hold NaN or Inf (replica {first} in tensor "
        f"{bad[first]!r}), so they cannot be merged: {advice}",
        bad[first],
        sorted(bad),
    )
