"""The probe side of :class:`~lightning_selmerge.imbalance.PositionLossMonitor`: build the probe,
evaluate models on it (the live one or the targets), bin and log the results."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_selmerge.data.seeding import stable_generator
from lightning_selmerge.imbalance.figure import plot_loss_by_position
from lightning_selmerge.imbalance.gather import gather_losses
from lightning_selmerge.imbalance.probe import PositionProbe
from lightning_selmerge.imbalance.replicas import ProbeTarget, ReplicaSchedule
from lightning_selmerge.imbalance.results import (
    ProbeResult,
    bin_losses,
    lookup_positions,
    result_metrics,
)
from lightning_selmerge.imbalance.targets import evaluate_targets, select_targets

__all__ = ["ProbeReporter"]


class ProbeReporter(Callback):
    """Base of :class:`~lightning_selmerge.imbalance.PositionLossMonitor`: its probe and logging.

    The monitor sets the attributes below; see its docstring for what is probed and logged.

    Example:
        >>> from lightning_selmerge.imbalance import PositionLossMonitor
        >>> issubclass(PositionLossMonitor, ProbeReporter)
        True
    """

    num_segments: int
    probe_size: int
    probe_batch_size: int
    probe_seed: int
    log_figure: bool
    tag_prefix: str
    probe: PositionProbe | None
    first_positions: torch.Tensor | None
    num_positions: int
    probe_targets: Callable[[Trainer, LightningModule], Iterable[ProbeTarget]] | None
    _positions_by_replica: dict[int, torch.Tensor]
    _schedule: ReplicaSchedule | None
    _gathers: bool

    def first_positions_of(self, replica: int) -> torch.Tensor:
        """Sample index -> first-epoch position (-1: not seen) in ``replica``'s pass."""
        if self.first_positions is None:
            raise RuntimeError(
                "PositionLossMonitor.first_positions_of: the first-epoch positions are set at the "
                "end of the first training epoch."
            )
        if replica not in self._positions_by_replica:
            raise KeyError(
                f"PositionLossMonitor: no first-epoch positions of replica {replica}; known "
                f"replicas: {sorted(self._positions_by_replica)}."
            )
        return self._positions_by_replica[replica]

    def evaluate_probe(
        self, module: torch.nn.Module, name: str = "", replica: int | None = None
    ) -> ProbeResult:
        """Evaluate ``module`` on the probe and bin its losses by first-epoch position.

        ``name`` labels the result ("" for the trained model; e.g. "merged", "replica_0"); log
        one or several results with :meth:`log_results`. ``replica`` picks whose first-epoch
        positions bin the losses (``None``: the primary replica's, :attr:`first_positions`).
        """
        if self.probe is None:
            raise RuntimeError(
                "PositionLossMonitor.evaluate_probe: no probe yet; it is built at the end of the "
                "first training epoch (the first-epoch positions are needed)."
            )
        losses = self.probe.evaluate(module)
        return self._result(name, self.probe.indices, losses, replica=replica)

    def metrics_for(self, result: ProbeResult) -> dict[str, float]:
        """The scalar tags and values of one result (see the class docstring for the names)."""
        return result_metrics(result, self.tag_prefix)

    def log_results(
        self,
        trainer: Trainer,
        results: Mapping[str, ProbeResult] | Sequence[ProbeResult],
        step: int | None = None,
        figure_tag: str | None = None,
        extra_metrics: Mapping[str, float] | None = None,
        epoch: int | None = None,
    ) -> dict[str, float]:
        """Log the scalars of every result and one figure holding all their curves.

        Returns the logged scalars. ``figure_tag`` defaults to ``<tag_prefix>/loss_by_position``;
        ``epoch`` (in the figure's title) to ``trainer.current_epoch``.
        """
        items = list(results.values()) if isinstance(results, Mapping) else list(results)
        step = trainer.global_step if step is None else step
        metrics: dict[str, float] = dict(extra_metrics or {})
        for result in items:
            metrics.update(self.metrics_for(result))
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        tb_loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if self.log_figure and tb_loggers and trainer.is_global_zero:
            curves = {r.name or "model": r.segment_means for r in items}
            epoch = trainer.current_epoch if epoch is None else epoch
            title = f"Loss by first-epoch position (epoch {epoch})"
            for logger in tb_loggers:
                fig = plot_loss_by_position(curves, title=title)
                logger.experiment.add_figure(
                    figure_tag or f"{self.tag_prefix}/loss_by_position", fig, global_step=step
                )
        return metrics

    def _build_probe(self, trainer: Trainer) -> None:
        if self.probe_size == 0 or self.first_positions is None:
            return
        loader = trainer.train_dataloader
        candidates = torch.nonzero(self.first_positions >= 0).reshape(-1)
        gen = stable_generator("selmerge.probe", self.probe_seed)
        chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[: self.probe_size]]
        self.probe = PositionProbe(
            loader.dataset,
            chosen.sort().values,
            batch_size=self.probe_batch_size,
            collate_fn=getattr(loader, "collate_fn", None),
        )

    def _probe_targets(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, ProbeResult]:
        """Probe the live module, or each target (:attr:`probe_targets`, else the schedule's)
        with its own weights; on several ranks, gather the targets' losses from their holders."""
        if self.probe_targets is not None:
            targets = list(self.probe_targets(trainer, pl_module))
            save: Callable[[], Mapping[str, torch.Tensor]] = lambda: {  # noqa: E731
                k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()
            }
            load: Callable[[Mapping[str, torch.Tensor]], None] = pl_module.load_state_dict
        elif self._schedule is not None:
            targets = list(self._schedule.probe_targets())
            save, load = self._schedule.module_state, self._schedule.load_module_state
        else:
            return {"": self.evaluate_probe(pl_module)}
        kept = select_targets(targets, known=self._positions_by_replica)
        probe = self.probe
        assert probe is not None
        losses = evaluate_targets(kept, lambda: probe.evaluate(pl_module), save, load)
        if self._gathers:
            losses = gather_losses(kept, losses)
        return {
            t.name: self._result(t.name, probe.indices, losses[t.name], replica=t.replica)
            for t in kept
        }

    def _result(
        self,
        name: str,
        indices: torch.Tensor,
        losses: torch.Tensor,
        replica: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> ProbeResult:
        """Bin ``losses`` by ``positions``, else by ``replica``'s (None: primary) positions."""
        assert self.first_positions is not None
        if positions is None:
            first = self.first_positions if replica is None else self.first_positions_of(replica)
            positions = lookup_positions(first, indices.long())
        return bin_losses(name, indices, losses, positions, self.num_segments, self.num_positions)
