r"""
Position-loss monitor
^^^^^^^^^^^^^^^^^^^^^

A callback that measures the data-order imbalance of fine-tuning (Ju et al., EMNLP 2024): samples
trained on early in the first epoch keep a higher loss at the end of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_selmerge.data.indexed import SAMPLE_INDEX_KEY, SAMPLE_LOSS_KEY
from lightning_selmerge.imbalance.batches import (
    batch_sample_indices,
    check_sample_indices,
    find_order_sampler,
    shard_layout,
)
from lightning_selmerge.imbalance.first_epoch import first_epoch_positions
from lightning_selmerge.imbalance.gather import gather_tables, in_replica_order
from lightning_selmerge.imbalance.probe import PositionProbe
from lightning_selmerge.imbalance.probing import ProbeReporter
from lightning_selmerge.imbalance.records import PositionRecords
from lightning_selmerge.imbalance.replicas import ProbeTarget, ReplicaSchedule
from lightning_selmerge.imbalance.results import (
    ProbeResult,
    row_positions,
)

__all__ = ["PositionLossMonitor", "ProbeResult", "ProbeTarget", "ReplicaSchedule"]

_FIX = (
    "define `per_sample_loss(self, batch) -> Tensor[B]` on your LightningModule (see "
    "lightning_selmerge.imbalance.losses), or set probe_size=0 and return "
    "{'loss': loss, 'sample_loss': Tensor[B]} from training_step"
)


class PositionLossMonitor(ProbeReporter):
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

    **Several replicas in one fit.** A strategy that trains several replicas (e.g.
    :class:`~lightning_selmerge.ensemble.DataOrderEnsemble`, K replicas one after another in
    each epoch, on one device or on several replica groups) tells the monitor who trains what by
    implementing :class:`~lightning_selmerge.imbalance.ReplicaSchedule`; the monitor finds it as
    ``trainer.strategy`` at setup, and no other callback needs to wire anything:

    * each batch is recorded under the replica that trains it
      (``schedule.replica_of(batch_idx)``) and at the positions the schedule gives
      (``schedule.batch_positions(batch_idx)``: positions in that replica's order of the
      epoch, from the start of its own pass). First-epoch positions are kept per replica
      (:meth:`first_positions_of`) and, with ``probe_size=0``, each training-loss row is binned
      by its own replica's positions. :attr:`first_positions` is the primary replica's (0 when
      several replicas are recorded).
    * at a probe epoch the models of ``schedule.probe_targets()`` are probed instead of the live
      module: each replica (``imbalance/replica_{k}/...``, binned by its own positions) and
      whatever else the strategy lists (a merge callback registers the merged model:
      ``imbalance/merged/...``). Each target's weights are loaded in turn and the live weights
      restored afterwards.
    * on several ranks the records of every epoch are gathered from all ranks at its end (each
      rank holds every replica's rows afterwards, in the order of one device: by replica, then
      position), and each target is probed by the ranks that hold it, its losses gathered; the
      checkpoint keeps each rank's rows of an epoch in progress, for a resume inside it.

    Without such a strategy the two attributes below do the same by hand (they win over the
    strategy when set):

    * :attr:`replica_of` (``batch_idx -> replica``): the replica of each training batch; the
      arrival counter restarts at 0 whenever the replica changes.
    * :attr:`probe_targets` (``(trainer, module) -> [ProbeTarget, ...]``): the models to probe,
      loaded with ``module.load_state_dict``.

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

    With an ensemble, alone (each replica probed, binned by its own first-epoch positions) or
    beside a merge callback (the merged model too)::

        trainer = Trainer(strategy=DataOrderEnsemble(num_replicas=4, shard_size=1),
                          devices=2, callbacks=[PositionLossMonitor(probe_size=512)])

    Note:
        The records and first-epoch positions are saved in checkpoints (:meth:`state_dict`), so a
        run resumed after epoch 0 keeps binning by the positions of its true first epoch. Without
        them (monitor added later), positions are taken from the loader's ``DataOrderSampler``
        for epoch 0 when there is one. Under data parallelism, epoch-0 records of all ranks are
        gathered once at the end of epoch 0 (with a replica schedule: every epoch's, at its
        end); every rank evaluates the whole probe and only global rank 0 logs.
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
        #: ``batch_idx -> replica`` of the training batches, set by hand; ``None``: the
        #: strategy's when it is a :class:`ReplicaSchedule`, else the train sampler's (else 0).
        self.replica_of: Callable[[int], int] | None = None
        #: ``(trainer, module) -> targets`` to probe instead of the live module, set by hand;
        #: ``None``: the strategy's when it is a :class:`ReplicaSchedule`, else the live module.
        self.probe_targets: Callable[[Trainer, LightningModule], Iterable[ProbeTarget]] | None = (
            None
        )
        self._positions_by_replica: dict[int, torch.Tensor] = {}
        self._primary_replica = 0
        self._arrived = 0
        self._last_replica: int | None = None
        self._resumed_epoch: int | None = None
        self._epoch: int | None = None  # the epoch in progress
        self._end_due: int | None = None  # the epoch whose batches all ran, its end not yet
        self._resumed_end: int | None = None  # the checkpoint's, until the resumed fit ends it
        #: the strategy, when it trains several replicas and says so (found at setup)
        self._schedule: ReplicaSchedule | None = None
        self._gathers = False  # a schedule on several ranks: gather every epoch's records
        self._gathered_epoch = -1  # the rows of later epochs are this rank's own

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        self._schedule = strategy if isinstance(strategy, ReplicaSchedule) else None
        self._gathers = self._schedule is not None and _distributed(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe_size > 0 and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise MisconfigurationException(
                f"PositionLossMonitor needs per-sample losses but {type(pl_module).__name__} has "
                f"no `per_sample_loss` method: {_FIX}."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        resumed = self._resumed_epoch
        if resumed != trainer.current_epoch or _resumes_mid_epoch(trainer.train_dataloader):
            return  # a new epoch, or a loader that goes on where it stopped (as the counter)
        rank_zero_warn(
            f"PositionLossMonitor: resumed inside epoch {resumed} with a train loader that "
            "starts the epoch again (Lightning resumes only stateful loaders): the epoch's "
            "positions are counted again from its start, its rows before the checkpoint "
            "dropped; checkpoint at epoch ends for an exact record."
        )
        table = self.records.table()
        keep = table["epoch"] != resumed
        self.records.merge([{k: v[keep] for k, v in table.items()}])
        self._arrived = 0
        self._last_replica = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_skipped_epoch(trainer, pl_module)
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if resumed == trainer.current_epoch:  # resumed mid-epoch: keep the restored counter
            return
        self._start_epoch(trainer.current_epoch)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._arrived = 0
        self._last_replica = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._end_skipped_epoch(trainer, pl_module)
        if self._epoch != trainer.current_epoch:  # its on_train_epoch_start did not run
            self._resumed_epoch = None
            self._start_epoch(trainer.current_epoch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_skipped_epoch(trainer, pl_module)

    def _end_skipped_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The end of the epoch a checkpoint was taken at the last batch of.

        Such a checkpoint (``ModelCheckpoint(every_n_train_steps=...)``) holds the epoch's
        batches all done but not its end; Lightning resumes it with the next epoch, calling
        neither the epoch's ``on_train_epoch_end`` nor the next one's ``on_train_epoch_start``.
        The resumed fit's first training hook here ends the epoch as the uninterrupted fit did
        (probe, log, first-epoch positions), after the strategy restored the replicas and
        before the next epoch trains; ``on_train_end`` when the fit has no batch left."""
        epoch, self._resumed_end = self._resumed_end, None
        if epoch is not None and epoch != trainer.current_epoch:
            self._end_epoch(trainer, pl_module, epoch)

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
        epoch = trainer.current_epoch
        if self._schedule is not None and self.replica_of is None:  # the strategy says where
            positions = torch.as_tensor(self._schedule.batch_positions(batch_idx)).long()
            indices = self._batch_indices(batch, loader, sample_loss, epoch, replica, positions)
            if positions.numel() != indices.numel():
                raise MisconfigurationException(
                    f"PositionLossMonitor: training batch {batch_idx} holds {indices.numel()} "
                    f"samples, but the strategy placed {positions.numel()} in it; keep the "
                    "train loader's batches as the strategy makes them."
                )
        else:
            num_shards, shard_rank = shard_layout(loader)
            indices = self._batch_indices(batch, loader, sample_loss, epoch, replica)
            positions = (self._arrived + torch.arange(indices.numel())) * num_shards + shard_rank
        self._arrived += indices.numel()
        if sample_loss is None and self.probe_size == 0:
            raise MisconfigurationException(
                "PositionLossMonitor(probe_size=0) bins training losses, but training_step did "
                f"not return {{'loss': ..., '{SAMPLE_LOSS_KEY}': Tensor[B]}}: return it, or use "
                "a probe (probe_size > 0) with a `per_sample_loss(batch)` method."
            )
        self.records.add(indices, positions, epoch=epoch, replica=replica, loss=sample_loss)
        self._end_due = epoch if batch_idx == trainer.num_training_batches - 1 else None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_due = self._resumed_end = None
        self._end_epoch(trainer, pl_module, trainer.current_epoch)

    def _end_epoch(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Gather ``epoch``'s records, set the first-epoch positions, probe and log."""
        if self._gathers:
            self._gather_records(epoch)
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
            if epoch > 0 and _distributed(trainer) and not self._gathers:
                # data-parallel ranks trained different rows (epoch 0's were gathered already)
                rows = {k: torch.cat([t[k] for t in gather_tables(rows)]) for k in rows}
            positions = row_positions(self._positions_by_replica, rows["sample"], rows["replica"])
            results = {"": self._result("", rows["sample"], rows["loss"], positions=positions)}
        self.log_results(trainer, results, epoch=epoch)

    # -- public API for other callbacks --------------------------------------------------------
    def current_replica(
        self, trainer: Trainer, pl_module: LightningModule, batch_idx: int | None = None
    ) -> int:
        """The replica of training batch ``batch_idx``.

        With ``batch_idx``: :attr:`replica_of` when it is set, else the strategy's
        ``replica_of`` when it is a :class:`ReplicaSchedule`; otherwise the train loader's
        ``DataOrderSampler.replica`` (0 without one).
        """
        if self.replica_of is not None and batch_idx is not None:
            return int(self.replica_of(batch_idx))
        if self._schedule is not None and batch_idx is not None:
            return int(self._schedule.replica_of(batch_idx))
        sampler = find_order_sampler(trainer.train_dataloader)
        return sampler.replica if sampler is not None else 0

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The records, first-epoch positions and the place in the epoch in progress.

        With a replica schedule on several ranks (a collective then, as checkpoints are), the
        rows of epochs not yet gathered are kept per rank under ``"rank_records"``."""
        records = self.records.state_dict()
        extra: dict[str, Any] = {}
        if self._gathers:
            table = records["columns"]
            own = table["epoch"] > self._gathered_epoch
            everyone = gather_tables({k: v[own] for k, v in table.items()})
            records = {"columns": {k: v[~own] for k, v in table.items()}}
            extra = {"rank_records": everyone, "gathered_epoch": self._gathered_epoch}
        return {
            **extra,
            "records": records,
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
            # saved at an epoch's last batch, before the epoch's end: end it on resume
            "epoch_end_due": self._end_due,
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
        self._gathered_epoch = int(state_dict.get("gathered_epoch", -1))
        if "rank_records" in state_dict:  # this rank's rows of the epochs not yet gathered
            everyone = state_dict["rank_records"]
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            own = everyone[torch.distributed.get_rank() if distributed else 0]
            self.records.merge([self.records.table(), own])
        in_epoch = state_dict.get("in_epoch")
        if in_epoch is not None and in_epoch["epoch"] is not None:
            self._resumed_epoch = self._epoch = int(in_epoch["epoch"])
            self._last_replica = in_epoch["replica"]
            self._arrived = int(in_epoch["arrived"])
        self._end_due = None
        self._resumed_end = state_dict.get("epoch_end_due")  # absent in older checkpoints

    # -- internals ----------------------------------------------------------------------------
    def _batch_indices(
        self,
        batch: Any,
        loader: Any,
        sample_loss: Any,
        epoch: int,
        replica: int,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        indices = batch_sample_indices(
            batch, loader, epoch, replica, positions, self._arrived, self.index_key
        )
        if sample_loss is not None and torch.as_tensor(sample_loss).numel() != indices.numel():
            raise MisconfigurationException(
                f"training_step returned {torch.as_tensor(sample_loss).numel()} "
                f"'{SAMPLE_LOSS_KEY}' values for a batch of {indices.numel()} samples; it must "
                "have shape [B]."
            )
        return indices

    def _gather_records(self, epoch: int) -> None:
        """Every rank's rows of ``epoch`` on every rank, in the order of one device."""
        table = self.records.table()
        mine = table["epoch"] == epoch
        rows = in_replica_order(gather_tables({k: v[mine] for k, v in table.items()}))
        self.records.merge([{k: v[~mine] for k, v in table.items()}, rows])
        self._gathered_epoch = epoch

    def _finalize_first_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _distributed(trainer) and not self._gathers:  # (a schedule gathers every epoch)
            others = self.records.table()
            rest = {k: v[others["epoch"] != 0] for k, v in others.items()}
            self.records.merge([*gather_tables(self.records.table(epoch=0)), rest])
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        num_samples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        if dataset is not None:
            check_sample_indices(dataset, self.records.table(epoch=0)["sample"])
        found = first_epoch_positions(
            self.records,
            num_samples,
            self.current_replica(trainer, pl_module),
            find_order_sampler(trainer.train_dataloader),
            None if self._schedule is None else self._schedule.num_replicas,
        )
        if found is None:
            return
        self._positions_by_replica, self._primary_replica = found
        self.first_positions = self._positions_by_replica[self._primary_replica]
        self.num_positions = max(
            (int(p.max()) + 1 for p in self._positions_by_replica.values() if p.numel()),
            default=0,
        )
        self._build_probe(trainer)


def _resumes_mid_epoch(loader: Any) -> bool:
    """Whether Lightning restores ``loader``'s place inside an epoch (a stateful loader, as
    ``DataOrderEnsemble``'s and ``ReplicaJob``'s; a plain DataLoader starts the epoch again)."""
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


def _distributed(trainer: Trainer) -> bool:
    """Whether the fit runs on several ranks of an initialized default process group."""
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    return trainer.world_size > 1 and available
