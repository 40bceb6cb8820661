r"""
Position-loss monitor
^^^^^^^^^^^^^^^^^^^^^

A callback that measures the data-order imbalance of fine-tuning (Ju et al., EMNLP 2024): samples
trained on early in the first epoch keep a higher loss at the end of training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_selmerge.data.indexed import SAMPLE_INDEX_KEY, SAMPLE_LOSS_KEY
from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.data.seeding import stable_generator
from lightning_selmerge.imbalance.figure import plot_loss_by_position
from lightning_selmerge.imbalance.probe import PositionProbe
from lightning_selmerge.imbalance.records import PositionRecords
from lightning_selmerge.imbalance.stats import position_loss_spearman, segment_means

__all__ = ["PositionLossMonitor", "ProbeResult", "ProbeTarget"]

_FIX = (
    "define `per_sample_loss(self, batch) -> Tensor[B]` on your LightningModule (see "
    "lightning_selmerge.imbalance.losses), or set probe_size=0 and return "
    "{'loss': loss, 'sample_loss': Tensor[B]} from training_step"
)


@dataclass
class ProbeResult:
    """Losses of the probe samples for one model, binned by first-epoch position."""

    name: str
    indices: torch.Tensor
    positions: torch.Tensor
    losses: torch.Tensor
    segment_means: torch.Tensor
    segment_counts: torch.Tensor
    spearman: float
    mean_loss: float = field(default=math.nan)


@dataclass
class ProbeTarget:
    """One model to probe at a probe epoch (see :attr:`PositionLossMonitor.probe_targets`).

    ``state_dict`` is loaded into the LightningModule for the evaluation (``None``: the live
    weights as they are); the losses are binned by the first-epoch positions of ``replica``.
    """

    name: str
    state_dict: Mapping[str, torch.Tensor] | None
    replica: int = 0


def _find_order_sampler(loader: Any) -> DataOrderSampler | None:
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(sampler, DataOrderSampler):
            return sampler
    return None


def _shard_layout(loader: Any) -> tuple[int, int]:
    """(number of shards, this shard) of a strided sampler; (1, 0) when the loader is unsharded."""
    sampler = _find_order_sampler(loader)
    if sampler is not None:
        return sampler.num_shards, sampler.shard_rank
    inner = getattr(loader, "sampler", None)
    if hasattr(inner, "num_replicas") and hasattr(inner, "rank"):  # DistributedSampler & co
        return int(inner.num_replicas), int(inner.rank)
    return 1, 0


class PositionLossMonitor(Callback):
    r"""Record each sample's first-epoch position and log loss-by-position at every epoch end.

    What it does:

    * during training, records ``(sample, replica, epoch, position, loss)`` for every sample that
      reaches ``training_step``. Sample indices come from ``batch["sample_index"]`` (wrap your
      dataset in :class:`~lightning_selmerge.data.IndexedDataset`) or, when the batch has no such
      key, from the train loader's :class:`~lightning_selmerge.data.DataOrderSampler` (in-order
      loading assumed). The position is the arrival order of the sample in its replica's pass
      over the epoch, counted across the shards of a strided sampler (``local_step_offset *
      num_shards + shard_rank``), so with a ``DataOrderSampler`` it equals
      :meth:`DataOrderSampler.positions`. The loss is ``training_step``'s ``"sample_loss"``
      output when it returns one (else NaN).
    * at the end of every ``probe_every_n_epochs``-th epoch, evaluates a fixed probe of at most
      ``probe_size`` training samples (seen in epoch 0) with ``module.per_sample_loss(batch)`` in
      eval mode under ``torch.no_grad()``; bins the losses by first-epoch position into
      ``num_segments`` segments; logs the results.

    Logged tags (``tag_prefix`` defaults to ``"imbalance"``; step = ``trainer.global_step``):

    ====================================  =====================================================
    ``imbalance/spearman``                Spearman rho(first-epoch position, probe loss);
                                          negative = early samples keep a higher loss
    ``imbalance/segment_{ss}_loss``       mean probe loss of segment ``ss`` (``00`` = earliest)
    ``imbalance/mean_loss``               mean probe loss
    ``imbalance/loss_by_position``        figure (TensorBoard only; other loggers get scalars)
    ====================================  =====================================================

    Other models evaluated on the same probe (e.g. a merged model and its replicas, by a merge
    callback) log under ``imbalance/<name>/...`` via :meth:`evaluate_probe` and
    :meth:`log_results`, which also draws several curves in one figure. Scalars are also put in
    ``trainer.callback_metrics`` so ``ModelCheckpoint(monitor="imbalance/spearman")`` works.

    Several replicas in one epoch (an ensemble training K replicas one after another) are driven
    by another callback through two attributes:

    * :attr:`replica_of` (``batch_idx -> replica``): the replica of each training batch. The
      arrival counter restarts at 0 whenever the replica changes, so each replica's positions
      count from the start of its own pass; first-epoch positions are kept per replica
      (:meth:`first_positions_of`) and, with ``probe_size=0``, each training-loss row is binned
      by its own replica's positions. :attr:`first_positions` is the primary replica's (0 when
      several replicas are recorded).
    * :attr:`probe_targets` (``(trainer, module) -> [ProbeTarget, ...]``): at a probe epoch,
      probe these models instead of the live module under ``""``: each target's weights are
      loaded into the module in turn, its losses binned by its ``replica``'s positions, and the
      live weights restored afterwards. All results are logged together under
      ``imbalance/<name>/...``.

    The module must define ``per_sample_loss(batch) -> Tensor[B]`` (unless ``probe_size=0``, in
    which case the epoch's training losses are binned instead); otherwise ``fit`` stops at start
    with a :class:`MisconfigurationException` naming the fix. Training losses are taken while
    the model learns: in epoch 0 a sample's position is also the time it was trained at, so
    their rho there is mostly the falling loss within the epoch, not the imbalance (read it
    from epoch 1 on, or use the probe, which evaluates every sample with the same weights).

    Args:
        num_segments: number of position segments (the paper uses 10).
        probe_size: at most this many training samples in the probe; ``0`` disables the probe.
        probe_batch_size: batch size of the probe evaluation.
        probe_every_n_epochs: run the probe at the end of every n-th epoch (and never mid-epoch).
        probe_seed: seed of the probe subset choice.
        log_figure: add the loss-by-position figure to TensorBoard loggers.
        index_key: batch key holding the sample indices.
        tag_prefix: first part of every logged tag.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning_selmerge.imbalance import PositionLossMonitor

        trainer = Trainer(max_epochs=3, logger=TensorBoardLogger("runs"),
                          callbacks=[PositionLossMonitor(probe_size=512)])
        trainer.fit(model, train_dataloaders=loader)   # batches carry "sample_index"

    Note:
        The records and first-epoch positions are saved in checkpoints (:meth:`state_dict`), so a
        run resumed after epoch 0 keeps binning by the positions of its true first epoch. Without
        them (monitor added later), positions are taken from the loader's ``DataOrderSampler``
        for epoch 0 when there is one. Under data parallelism, epoch-0 records of all ranks are
        gathered once at the end of epoch 0; every rank evaluates the whole probe and only global
        rank 0 logs.
    """

    def __init__(
        self,
        num_segments: int = 10,
        probe_size: int = 1024,
        probe_batch_size: int = 64,
        probe_every_n_epochs: int = 1,
        probe_seed: int = 0,
        log_figure: bool = True,
        index_key: str = SAMPLE_INDEX_KEY,
        tag_prefix: str = "imbalance",
    ) -> None:
        if num_segments < 1 or probe_size < 0 or probe_batch_size < 1 or probe_every_n_epochs < 1:
            raise ValueError(
                "PositionLossMonitor: need num_segments >= 1, probe_size >= 0, "
                "probe_batch_size >= 1 and probe_every_n_epochs >= 1."
            )
        self.num_segments = num_segments
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.probe_every_n_epochs = probe_every_n_epochs
        self.probe_seed = probe_seed
        self.log_figure = log_figure
        self.index_key = index_key
        self.tag_prefix = tag_prefix.rstrip("/")
        self.records = PositionRecords()
        #: sample index -> first-epoch position (-1: not seen); set at the end of epoch 0.
        self.first_positions: torch.Tensor | None = None
        #: number of positions in the first epoch (segment boundaries are fractions of it).
        self.num_positions: int = 0
        self.probe: PositionProbe | None = None
        #: ``batch_idx -> replica`` of the training batches, set by an ensemble callback;
        #: ``None``: the replica is the train sampler's (else 0).
        self.replica_of: Callable[[int], int] | None = None
        #: ``(trainer, module) -> targets`` to probe instead of the live module, set by a
        #: callback (e.g. a merged model and the replicas); ``None``: probe the live module.
        self.probe_targets: Callable[[Trainer, LightningModule], Iterable[ProbeTarget]] | None = (
            None
        )
        self._positions_by_replica: dict[int, torch.Tensor] = {}
        self._primary_replica = 0
        self._arrived = 0
        self._last_replica: int | None = None
        self._resumed_epoch: int | None = None
        self._epoch: int | None = None  # the epoch in progress

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe_size > 0 and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise MisconfigurationException(
                f"PositionLossMonitor needs per-sample losses but {type(pl_module).__name__} has "
                f"no `per_sample_loss` method: {_FIX}."
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if resumed == trainer.current_epoch:  # resumed mid-epoch: keep the restored counter
            return
        self._epoch = trainer.current_epoch
        self._arrived = 0
        self._last_replica = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loader = trainer.train_dataloader
        sample_loss = outputs.get(SAMPLE_LOSS_KEY) if isinstance(outputs, Mapping) else None
        replica = self.current_replica(trainer, pl_module, batch_idx)
        if replica != self._last_replica:
            self._arrived = 0  # positions count from the start of each replica's pass
            self._last_replica = replica
        indices = self._batch_indices(batch, loader, sample_loss, trainer.current_epoch, replica)
        num_shards, shard_rank = _shard_layout(loader)
        local = self._arrived + torch.arange(indices.numel())
        self._arrived += indices.numel()
        if sample_loss is None and self.probe_size == 0:
            raise MisconfigurationException(
                "PositionLossMonitor(probe_size=0) bins training losses, but training_step did "
                f"not return {{'loss': ..., '{SAMPLE_LOSS_KEY}': Tensor[B]}}: return it, or use "
                "a probe (probe_size > 0) with a `per_sample_loss(batch)` method."
            )
        self.records.add(
            indices,
            local * num_shards + shard_rank,
            epoch=trainer.current_epoch,
            replica=replica,
            loss=sample_loss,
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == 0 or self.first_positions is None:
            self._finalize_first_epoch(trainer, pl_module)
        if self.first_positions is None or (epoch + 1) % self.probe_every_n_epochs:
            return
        if self.probe is None:
            self._build_probe(trainer)  # e.g. after resuming from a checkpoint
        if self.probe_size > 0:
            results = self._probe_targets(trainer, pl_module)
        else:  # the losses of this epoch's training steps, each row by its replica's positions
            rows = self.records.table(epoch=epoch)
            positions = self._row_positions(rows["sample"], rows["replica"])
            results = {"": self._result("", rows["sample"], rows["loss"], positions=positions)}
        self.log_results(trainer, results)

    # -- public API for other callbacks --------------------------------------------------------
    def current_replica(
        self, trainer: Trainer, pl_module: LightningModule, batch_idx: int | None = None
    ) -> int:
        """The replica of training batch ``batch_idx``.

        :attr:`replica_of` decides when it is set and ``batch_idx`` is given; otherwise the
        train loader's ``DataOrderSampler.replica`` (0 without one).
        """
        if self.replica_of is not None and batch_idx is not None:
            return int(self.replica_of(batch_idx))
        sampler = _find_order_sampler(trainer.train_dataloader)
        return sampler.replica if sampler is not None else 0

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
        metrics = {
            self._tag(result.name, "spearman"): result.spearman,
            self._tag(result.name, "mean_loss"): result.mean_loss,
        }
        for s, value in enumerate(result.segment_means.tolist()):
            metrics[self._tag(result.name, f"segment_{s:02d}_loss")] = value
        return metrics

    def log_results(
        self,
        trainer: Trainer,
        results: Mapping[str, ProbeResult] | Sequence[ProbeResult],
        step: int | None = None,
        figure_tag: str | None = None,
        extra_metrics: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Log the scalars of every result and one figure holding all their curves.

        Returns the logged scalars. ``figure_tag`` defaults to ``<tag_prefix>/loss_by_position``.
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
            title = f"Loss by first-epoch position (epoch {trainer.current_epoch})"
            for logger in tb_loggers:
                fig = plot_loss_by_position(curves, title=title)
                logger.experiment.add_figure(
                    figure_tag or f"{self.tag_prefix}/loss_by_position", fig, global_step=step
                )
        return metrics

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "records": self.records.state_dict(),
            "first_positions": self.first_positions,
            "num_positions": self.num_positions,
            "replica_positions": dict(self._positions_by_replica),
            "primary_replica": self._primary_replica,
            # where the epoch in progress stands, for a resume in the middle of it
            "in_epoch": {
                "epoch": self._epoch,
                "replica": self._last_replica,
                "arrived": self._arrived,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records.load_state_dict(state_dict["records"])
        self.first_positions = state_dict["first_positions"]
        self.num_positions = int(state_dict["num_positions"])
        if "replica_positions" in state_dict:
            by_replica = state_dict["replica_positions"]
            self._positions_by_replica = {int(k): v for k, v in by_replica.items()}
            self._primary_replica = int(state_dict["primary_replica"])
        else:  # saved before per-replica positions: one replica, the one recorded in epoch 0
            recorded = self.records.table(epoch=0)["replica"].unique().tolist()
            self._primary_replica = int(recorded[0]) if len(recorded) == 1 else 0
            self._positions_by_replica = {}
            if self.first_positions is not None:
                self._positions_by_replica[self._primary_replica] = self.first_positions
        self.probe = None  # rebuilt lazily from the restored positions
        in_epoch = state_dict.get("in_epoch")
        if in_epoch is not None and in_epoch["epoch"] is not None:
            self._resumed_epoch = self._epoch = int(in_epoch["epoch"])
            self._last_replica = in_epoch["replica"]
            self._arrived = int(in_epoch["arrived"])

    # -- internals ----------------------------------------------------------------------------
    def _tag(self, name: str, leaf: str) -> str:
        return f"{self.tag_prefix}/{name}/{leaf}" if name else f"{self.tag_prefix}/{leaf}"

    def _batch_indices(
        self, batch: Any, loader: Any, sample_loss: Any, epoch: int, replica: int
    ) -> torch.Tensor:
        if isinstance(batch, Mapping) and self.index_key in batch:
            indices = torch.as_tensor(batch[self.index_key]).reshape(-1).long().cpu()
        else:
            sampler = _find_order_sampler(loader)
            if sampler is None:
                raise MisconfigurationException(
                    f"PositionLossMonitor cannot tell which samples a batch holds: the batch has "
                    f"no {self.index_key!r} key and the train loader has no DataOrderSampler. "
                    "Wrap the dataset in lightning_selmerge.data.IndexedDataset (dict batches "
                    f"with {self.index_key!r}) or sample with DataOrderSampler."
                )
            order = sampler.indices(epoch, replica)
            size = getattr(loader, "batch_size", None) or _batch_len(batch)
            indices = order[self._arrived : self._arrived + size]
        if sample_loss is not None and torch.as_tensor(sample_loss).numel() != indices.numel():
            raise MisconfigurationException(
                f"training_step returned {torch.as_tensor(sample_loss).numel()} "
                f"'{SAMPLE_LOSS_KEY}' values for a batch of {indices.numel()} samples; it must "
                "have shape [B]."
            )
        return indices

    def _finalize_first_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        table = self.records.table(epoch=0)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if trainer.world_size > 1 and distributed:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, table)
            others = self.records.table()
            rest = {k: v[others["epoch"] != 0] for k, v in others.items()}
            self.records.merge([*gathered, rest])
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        num_samples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        recorded = [int(r) for r in self.records.table(epoch=0)["replica"].unique().tolist()]
        if len(recorded) > 1:
            primary = 0 if 0 in recorded else recorded[0]
        else:
            primary = self.current_replica(trainer, pl_module)
        by_replica = {
            r: self.records.first_positions(num_samples, replica=r, epoch=0) for r in recorded
        }
        sampler = _find_order_sampler(trainer.train_dataloader)
        if primary not in by_replica:
            if sampler is None:
                rank_zero_warn(
                    "PositionLossMonitor: no first-epoch records and no DataOrderSampler; "
                    "loss-by-position is not available for this run."
                )
                return
            by_replica[primary] = sampler.positions(epoch=0, replica=primary)
        self._positions_by_replica = by_replica
        self._primary_replica = primary
        self.first_positions = by_replica[primary]
        self.num_positions = max(
            (int(p.max()) + 1 for p in by_replica.values() if p.numel()), default=0
        )
        if sampler is not None and not all(
            _agrees(by_replica[r], sampler.positions(epoch=0, replica=r)) for r in recorded
        ):
            rank_zero_warn(
                "PositionLossMonitor: the positions observed in training_step differ from "
                "the DataOrderSampler's order for epoch 0; using the observed ones."
            )
        self._build_probe(trainer)

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

    def _row_positions(self, samples: torch.Tensor, replicas: torch.Tensor) -> torch.Tensor:
        """First-epoch position of every row in its own replica's pass (-1: unknown)."""
        out = torch.full_like(samples, -1)
        for replica in replicas.unique().tolist():
            first = self._positions_by_replica.get(int(replica))
            if first is not None:
                rows = replicas == replica
                out[rows] = _lookup(first, samples[rows])
        return out

    def _probe_targets(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, ProbeResult]:
        """Probe the live module, or each of :attr:`probe_targets` with its own weights."""
        if self.probe_targets is None:
            return {"": self.evaluate_probe(pl_module)}
        results: dict[str, ProbeResult] = {}
        live: dict[str, torch.Tensor] | None = None  # copy of the live weights, once replaced
        try:
            for target in self.probe_targets(trainer, pl_module):
                if target.replica not in self._positions_by_replica:
                    rank_zero_warn(
                        f"PositionLossMonitor: {target.name!r} is binned by replica "
                        f"{target.replica}'s first-epoch positions, which were never recorded "
                        "(that replica trained on no batch, e.g. under max_steps); skipped."
                    )
                    continue
                if target.name in results:
                    raise ValueError(
                        f"PositionLossMonitor.probe_targets: two targets named {target.name!r}."
                    )
                state = target.state_dict
                if state is None and live is not None:
                    state = live  # the live weights, not the previous target's
                if state is not None:
                    if live is None:
                        live = {
                            k: v.detach().to("cpu", copy=True)
                            for k, v in pl_module.state_dict().items()
                        }
                    pl_module.load_state_dict(state)
                results[target.name] = self.evaluate_probe(
                    pl_module, name=target.name, replica=target.replica
                )
        finally:
            if live is not None:
                pl_module.load_state_dict(live)
        return results

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
        indices = indices.long()
        if positions is None:
            first = self.first_positions if replica is None else self.first_positions_of(replica)
            positions = _lookup(first, indices)
        means, counts = segment_means(
            positions, losses, self.num_segments, num_positions=max(self.num_positions, 1)
        )
        valid = (positions >= 0) & torch.isfinite(losses)
        mean_loss = float(losses[valid].mean()) if bool(valid.any()) else math.nan
        return ProbeResult(
            name=name,
            indices=indices,
            positions=positions,
            losses=losses,
            segment_means=means,
            segment_counts=counts,
            spearman=position_loss_spearman(positions, losses),
            mean_loss=mean_loss,
        )


def _agrees(observed: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether every observed position (>= 0) equals the expected one."""
    n = min(observed.numel(), expected.numel())
    seen = observed[:n] >= 0
    return torch.equal(observed[:n][seen], expected[:n][seen]) and bool((observed[n:] < 0).all())


def _lookup(first: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``first[indices]``, with -1 for indices beyond ``first``."""
    out = torch.full_like(indices, -1)
    in_range = indices < first.numel()
    out[in_range] = first[indices[in_range]]
    return out


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    raise MisconfigurationException("PositionLossMonitor: cannot infer the batch size.")
