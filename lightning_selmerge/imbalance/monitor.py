r"""
Position-loss monitor
^^^^^^^^^^^^^^^^^^^^^

A callback that measures the data-order imbalance of fine-tuning (Ju et al., EMNLP 2024): samples
trained on early in the first epoch keep a higher loss at the end of training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

__all__ = ["PositionLossMonitor", "ProbeResult"]

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
      loading assumed). The position is the arrival order of the sample in the epoch, counted
      across the shards of a strided sampler (``local_step_offset * num_shards + shard_rank``), so
      with a ``DataOrderSampler`` it equals :meth:`DataOrderSampler.positions`. The loss is
      ``training_step``'s ``"sample_loss"`` output when it returns one (else NaN).
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
    ``imbalance/train/spearman``          rho(first-epoch position, loss when trained this
                                          epoch); only when training_step returns sample_loss
    ``imbalance/loss_by_position``        figure (TensorBoard only; other loggers get scalars)
    ====================================  =====================================================

    Other models evaluated on the same probe (e.g. a merged model and its replicas, by a merge
    callback) log under ``imbalance/<name>/...`` via :meth:`evaluate_probe` and
    :meth:`log_results`, which also draws several curves in one figure. Scalars are also put in
    ``trainer.callback_metrics`` so ``ModelCheckpoint(monitor="imbalance/spearman")`` works.

    The module must define ``per_sample_loss(batch) -> Tensor[B]`` (unless ``probe_size=0``, in
    which case the epoch's training losses are binned instead); otherwise ``fit`` stops at start
    with a :class:`MisconfigurationException` naming the fix.

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
        self._arrived = 0
        self._epoch_has_loss = False

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe_size > 0 and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise MisconfigurationException(
                f"PositionLossMonitor needs per-sample losses but {type(pl_module).__name__} has "
                f"no `per_sample_loss` method: {_FIX}."
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._arrived = 0
        self._epoch_has_loss = False

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
        indices = self._batch_indices(batch, loader, sample_loss)
        num_shards, shard_rank = _shard_layout(loader)
        local = self._arrived + torch.arange(indices.numel())
        self._arrived += indices.numel()
        if sample_loss is None and self.probe_size == 0:
            raise MisconfigurationException(
                "PositionLossMonitor(probe_size=0) bins training losses, but training_step did "
                f"not return {{'loss': ..., '{SAMPLE_LOSS_KEY}': Tensor[B]}}: return it, or use "
                "a probe (probe_size > 0) with a `per_sample_loss(batch)` method."
            )
        self._epoch_has_loss |= sample_loss is not None
        self.records.add(
            indices,
            local * num_shards + shard_rank,
            epoch=trainer.current_epoch,
            replica=self.current_replica(trainer, pl_module),
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
        metrics: dict[str, float] = {}
        if self._epoch_has_loss:
            rows = self.records.table(epoch=epoch)
            pos = self.first_positions[rows["sample"].clamp(max=self.first_positions.numel() - 1)]
            metrics[self._tag("train", "spearman")] = position_loss_spearman(pos, rows["loss"])
        if self.probe_size > 0:
            result = self.evaluate_probe(pl_module)
        else:
            rows = self.records.table(epoch=epoch)
            result = self._result("", rows["sample"], rows["loss"])
        self.log_results(trainer, {"": result}, extra_metrics=metrics)

    # -- public API for other callbacks --------------------------------------------------------
    def current_replica(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """The replica whose data the current batch belongs to (the sampler's, else 0)."""
        sampler = _find_order_sampler(trainer.train_dataloader)
        return sampler.replica if sampler is not None else 0

    def evaluate_probe(self, module: torch.nn.Module, name: str = "") -> ProbeResult:
        """Evaluate ``module`` on the probe and bin its losses by first-epoch position.

        ``name`` labels the result ("" for the trained model; e.g. "merged", "replica_0"); log
        one or several results with :meth:`log_results`.
        """
        if self.probe is None:
            raise RuntimeError(
                "PositionLossMonitor.evaluate_probe: no probe yet; it is built at the end of the "
                "first training epoch (the first-epoch positions are needed)."
            )
        losses = self.probe.evaluate(module)
        return self._result(name, self.probe.indices, losses)

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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records.load_state_dict(state_dict["records"])
        self.first_positions = state_dict["first_positions"]
        self.num_positions = int(state_dict["num_positions"])
        self.probe = None  # rebuilt lazily from the restored positions

    # -- internals ----------------------------------------------------------------------------
    def _tag(self, name: str, leaf: str) -> str:
        return f"{self.tag_prefix}/{name}/{leaf}" if name else f"{self.tag_prefix}/{leaf}"

    def _batch_indices(self, batch: Any, loader: Any, sample_loss: Any) -> torch.Tensor:
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
            order = sampler.indices()
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
        replica = self.current_replica(trainer, pl_module)
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
        if len(self.records.table(epoch=0, replica=replica)["sample"]):
            positions = self.records.first_positions(num_samples, replica=replica, epoch=0)
        else:
            sampler = _find_order_sampler(trainer.train_dataloader)
            if sampler is None:
                rank_zero_warn(
                    "PositionLossMonitor: no first-epoch records and no DataOrderSampler; "
                    "loss-by-position is not available for this run."
                )
                return
            positions = sampler.positions(epoch=0, replica=replica)
        self.first_positions = positions
        self.num_positions = int(positions.max()) + 1 if positions.numel() else 0
        sampler = _find_order_sampler(trainer.train_dataloader)
        if sampler is not None and len(self.records.table(epoch=0, replica=replica)["sample"]):
            expected = sampler.positions(epoch=0, replica=replica)
            seen = positions >= 0
            if not torch.equal(expected[seen], positions[seen]):
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

    def _result(self, name: str, indices: torch.Tensor, losses: torch.Tensor) -> ProbeResult:
        assert self.first_positions is not None
        indices = indices.long()
        in_range = indices < self.first_positions.numel()
        positions = torch.full_like(indices, -1)
        positions[in_range] = self.first_positions[indices[in_range]]
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


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    raise MisconfigurationException("PositionLossMonitor: cannot infer the batch size.")
