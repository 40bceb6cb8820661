"""Probe several models in turn with one module: load each target's weights, then restore."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_selmerge.imbalance.replicas import ProbeTarget

__all__ = ["evaluate_targets", "select_targets"]


def evaluate_targets(
    targets: Sequence[ProbeTarget],
    evaluate: Callable[[], torch.Tensor],
    save: Callable[[], Mapping[str, torch.Tensor]],
    load: Callable[[Mapping[str, torch.Tensor]], None],
) -> dict[str, torch.Tensor]:
    """Probe losses of every local target, by name, in order; the live weights are restored.

    ``evaluate()`` probes the module as it is, ``save()`` copies its live weights (taken once,
    before the first target is loaded) and ``load(state)`` loads weights into it. A target whose
    ``state_dict`` is ``None`` is evaluated with the live weights, even after other targets were
    loaded. The live weights are back when this returns or raises.

    Example:
        >>> module = torch.nn.Linear(1, 1, bias=False)
        >>> _ = module.weight.data.fill_(1.0)
        >>> targets = [ProbeTarget("two", {"weight": torch.full((1, 1), 2.0)}),
        ...            ProbeTarget("live", None)]
        >>> evaluate_targets(targets, lambda: module.weight.detach().reshape(1).clone(),
        ...                  lambda: {k: v.clone() for k, v in module.state_dict().items()},
        ...                  module.load_state_dict)
        {'two': tensor([2.]), 'live': tensor([1.])}
        >>> module.weight.item()
        1.0
    """
    losses: dict[str, torch.Tensor] = {}
    live: Mapping[str, torch.Tensor] | None = None  # copy of the live weights, once replaced
    try:
        for target in targets:
            if not target.local:
                continue
            state = target.state_dict
            if state is None and live is not None:
                state = live  # the live weights, not the previous target's
            if state is not None:
                if live is None:
                    live = save()
                load(state)
            losses[target.name] = evaluate()
    finally:
        if live is not None:
            load(live)
    return losses


def select_targets(targets: Iterable[ProbeTarget], known: Container[int]) -> list[ProbeTarget]:
    """The targets whose replica has ``known`` first-epoch positions (the others are skipped
    with a warning); two targets of one name are refused.

    Example:
        >>> [t.name for t in select_targets([ProbeTarget("a", None, 0)], known={0})]
        ['a']
    """
    kept: list[ProbeTarget] = []
    for target in targets:
        if target.replica not in known:
            rank_zero_warn(
                f"PositionLossMonitor: {target.name!r} is binned by replica "
                f"{target.replica}'s first-epoch positions, which were never recorded "
                "(that replica trained on no batch, e.g. under max_steps); skipped."
            )
            continue
        if any(target.name == other.name for other in kept):
            raise ValueError(
                f"PositionLossMonitor.probe_targets: two targets named {target.name!r}."
            )
        kept.append(target)
    return kept
