"""What :class:`DataOrderEnsemble` tells a
:class:`~lightning_selmerge.imbalance.PositionLossMonitor` (the
:class:`~lightning_selmerge.imbalance.replicas.ReplicaSchedule` protocol): where each training
batch's samples sit in their replica's order, and which models to probe (every replica, plus the
extras other callbacks add, e.g. the merge).

Example:
    >>> from lightning_selmerge.ensemble import DataOrderEnsemble
    >>> from lightning_selmerge.imbalance.replicas import ReplicaSchedule
    >>> strategy = DataOrderEnsemble(num_replicas=2)
    >>> isinstance(strategy, ReplicaSchedule)
    True
    >>> strategy.add_probe_target("merged", lambda: None)  # skipped while it gives None
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from lightning_selmerge.imbalance.replicas import ProbeTarget

if TYPE_CHECKING:
    from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler

__all__ = ["ProbeSchedule"]


class ProbeSchedule:
    """The monitor's side of the ensemble strategy (a mixin of :class:`DataOrderEnsemble`,
    which provides ``batch_sampler``, ``num_replicas`` and ``local_replica_states``)."""

    batch_sampler: EnsembleBatchSampler | None
    num_replicas: int
    local_replica_states: Callable[[], dict[int, dict[str, torch.Tensor]]]

    #: extra models to probe, by name: (``() -> state or None``, replica binning it)
    _probe_extras: Mapping[str, tuple[Callable[[], Mapping[str, torch.Tensor] | None], int]] = (
        MappingProxyType({})
    )

    def batch_positions(self, batch_idx: int) -> torch.Tensor:
        """Positions of training batch ``batch_idx``'s samples in its replica's order of the
        epoch, counted over the replica's shard ranks (see
        :meth:`EnsembleBatchSampler.batch_positions`)."""
        if self.batch_sampler is None:
            raise RuntimeError("DataOrderEnsemble: the train dataloader is not set up yet.")
        return self.batch_sampler.batch_positions(batch_idx)

    def add_probe_target(
        self,
        name: str,
        state: Callable[[], Mapping[str, torch.Tensor] | None],
        replica: int = 0,
    ) -> None:
        """Have a :class:`~lightning_selmerge.imbalance.PositionLossMonitor` also probe the
        model ``state()`` returns (this rank's slices, as :meth:`load_module_state` takes;
        skipped while it returns ``None``), binned by ``replica``'s first-epoch positions:
        e.g. the merge of ``SelectionMergeCallback``, as ``"merged"``. Every rank holds it."""
        self._probe_extras = {**self._probe_extras, name: (state, int(replica))}

    def probe_targets(self) -> list[ProbeTarget]:
        """The monitor's models: ``replica_{k}`` for every replica (``local=False`` where
        another replica group holds it), then the :meth:`add_probe_target` ones."""
        held = self.local_replica_states()
        targets = [
            ProbeTarget(f"replica_{k}", held.get(k), replica=k, local=k in held)
            for k in range(self.num_replicas)
        ]
        for name, (state, replica) in self._probe_extras.items():
            value = state()
            if value is not None:
                targets.append(ProbeTarget(name, value, replica=replica))
        return targets
