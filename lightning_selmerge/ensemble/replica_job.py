"""``ReplicaJob``: train replica k of K as an ordinary Lightning fit, as the ensemble would."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.ensemble import replica_snapshots as snapshots
from lightning_selmerge.ensemble.loader import ResumableLoader, resumable_loader
from lightning_selmerge.ensemble.recipe import resumed_recipe, training_recipe
from lightning_selmerge.ensemble.replica_job_checks import check_replica_args, check_trainer
from lightning_selmerge.ensemble.rng import rng_states, seed_replica_pass, set_rng_states
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler

__all__ = ["ReplicaJob", "check_replica_args"]


class _ReplicaLoader(ResumableLoader):
    """A replica job's train loader: its saved position holds the batch size, checked on resume."""

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self.progress()
        assert isinstance(self.batch_sampler, EnsembleBatchSampler)
        size = self.batch_sampler.batch_size
        return {"epoch": epoch, "batches_done": done, "batch_size": size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert isinstance(self.batch_sampler, EnsembleBatchSampler)
        saved, size = state.get("batch_size"), self.batch_sampler.batch_size
        if saved is not None and int(saved) != size and int(state["batches_done"]):
            raise MisconfigurationException(
                f"ReplicaJob: the checkpoint stopped after {state['batches_done']} batches of "
                f"size {saved} in epoch {state['epoch']}, but this fit's batch_size is {size}: "
                "the replica would skip or repeat samples. Resume with batch_size="
                f"{saved}, or resume from a checkpoint saved at an epoch end."
            )
        self.batch_sampler.resume(int(state["epoch"]), int(state["batches_done"]))


class ReplicaJob(Callback):
    """Make a fit train replica ``replica`` of a ``num_replicas``-replica ensemble, and write its
    weights to ``snapshot_dir/epoch_{e:03d}/replica_{k:03d}`` at the end of every epoch.

    K such jobs (a SLURM array, K torchrun launches, a shell loop), each with its own strategy
    (one device, DDP, FSDP), train what one ``DataOrderEnsemble(num_replicas=K, seed=seed,
    fixed_batches=...)`` fit trains, bit for bit on the CPU; merging their snapshots of an epoch
    (``lightning-selmerge merge``) gives ``SelectionMergeCallback``'s merge of that epoch (with
    the same merge seed and the ``initial`` snapshot as the base). What makes replica k the same:

    * **data order**: the train loader's sampler is replaced (dataset, batch size, ``drop_last``,
      collate function and workers kept) by replica k's order of each epoch,
      ``DataOrderSampler(dataset, seed, fixed_batches).order(epoch, k)``, cut into batches as
      the ensemble cuts it. On N data-parallel ranks the batches are dealt round-robin (rank r
      gets batches r, r + N, ...), as to the ranks of a replica sharded over N ranks
      (``shard_size=N``). This goes through the strategy's public ``process_dataloader`` hook,
      wrapped for the fit, so it works with any strategy (it runs after Lightning's own sampler
      injection);
    * **randomness**: at the start of each epoch's training batches, torch, python and numpy
      are seeded from (the fit's seed, ``seed``, epoch, k), as the ensemble seeds replica k's
      pass. Call ``seed_everything`` with the same value in every job (the CLI's
      ``seed_everything``), as for the ensemble fit;
    * **start**: the module's weights at fit start (every job must build the same ones: the
      first snapshot records their fingerprint and jobs of one ``snapshot_dir`` must agree);
      fresh optimizer, LR scheduler and loss-scaler states, as each replica gets in the
      ensemble.

    Not reproducible by independent jobs, hence refused: ``SelectionMergeCallback`` (merge the
    snapshots instead; its ``sync_replicas=True`` resets every replica to the merge each epoch,
    which needs all replicas in one fit) and ``DataOrderEnsemble`` itself. Differences that do
    not touch the weights: ``trainer.global_step`` counts this replica's steps only; validation
    scores this replica (not the merge); a ``ReduceLROnPlateau`` follows this replica's metric
    (in the ensemble, the merged model's), so it trains differently there.

    **Snapshots**: a ``save_pretrained`` directory (with the tokenizer and ``selmerge.json``)
    when the module keeps a Hugging Face model as ``self.model`` and nothing else; else
    ``replica_{k:03d}.safetensors`` holding the module's state dict, its record in the file's
    metadata. Each is written under a temporary name and renamed; under several ranks the full
    state dict is gathered as Lightning's checkpointing does (a full state dict under FSDP) and
    global rank 0 writes. ``epoch_{e:03d}/selmerge.json`` records ``num_replicas``, ``seed``,
    ``epoch`` and ``fixed_batches``; the replica's own record adds ``replica``, ``global_step``
    and ``initial_fingerprint``. With ``save_initial`` the job of replica 0 also writes the
    weights at fit start to ``snapshot_dir/initial`` (the base of ``--resample``). A snapshot is
    written at the last training batch of each epoch, before validation and before any
    checkpoint of that epoch; an epoch cut short (``max_steps`` inside it, a stop) gets none.

    **Restarts**: resume with ``trainer.fit(..., ckpt_path=...)`` (CLI: ``--ckpt_path last``
    with ``ModelCheckpoint(save_last=True)``): the order continues exactly, also from a
    checkpoint saved inside an epoch (the loader skips the batches done; the RNG states of
    global rank 0 are restored, which every rank shares since each epoch seeds every rank
    alike); a snapshot the killed job had not written yet is written on resume. A checkpoint of
    another replica, K, seed or ``fixed_batches`` is refused, as is a ``snapshot_dir`` holding
    another run's snapshots.

    Args:
        num_replicas: K >= 2.
        replica: k, in ``0 .. K-1``.
        seed: the ensemble's data-order seed (``DataOrderEnsemble(seed=...)``).
        snapshot_dir: where the snapshots go (shared by the K jobs).
        fixed_batches: as ``DataOrderEnsemble(fixed_batches=True)`` (paper Table 4).
        save_initial: the job of replica 0 writes ``snapshot_dir/initial``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> job = ReplicaJob(num_replicas=4, replica=2, seed=0, snapshot_dir="snapshots")
        >>> trainer = Trainer(callbacks=[job], accelerator="cpu", devices=1, logger=False)
        >>> job.logger_version
        'replica_002'
    """

    def __init__(
        self,
        num_replicas: int,
        replica: int,
        seed: int,
        snapshot_dir: str | Path,
        fixed_batches: bool = False,
        save_initial: bool = True,
    ) -> None:
        check_replica_args(num_replicas, replica)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"ReplicaJob: seed={seed!r} must be an int.")
        self.num_replicas = num_replicas
        self.replica = replica
        self.seed = seed
        self.snapshot_dir = Path(snapshot_dir)
        self.fixed_batches = bool(fixed_batches)
        self.save_initial = save_initial
        self.batch_sampler: EnsembleBatchSampler | None = None
        self._rng_base = 0
        self._initial_fingerprint: str | None = None
        self._recipe: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self._wrapped: Any = None  # the strategy whose process_dataloader is wrapped
        self._stopped_in: int | None = None
        self._complete_epoch: int | None = None  # the module holds this epoch's end weights

    @property
    def logger_version(self) -> str:
        """``replica_{k:03d}``: a logger version that puts the K jobs' logs in one tree, e.g.
        ``TensorBoardLogger("runs", name="exp", version=job.logger_version)``."""
        return f"replica_{self.replica:03d}"

    def _identity(self) -> dict[str, Any]:
        return {
            "num_replicas": self.num_replicas,
            "replica": self.replica,
            "seed": self.seed,
            "fixed_batches": self.fixed_batches,
        }

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_trainer(trainer)
        if "PL_GLOBAL_SEED" not in os.environ:
            rank_zero_warn(
                "ReplicaJob: no seed_everything(...) was called, so this job's dropout (and a "
                "randomly initialised model) will not match the other jobs or the ensemble; "
                "call seed_everything with the same seed in every job."
            )
        problem = None
        if trainer.is_global_zero:
            snapshots.remove_stale_temporaries(self.snapshot_dir, self.replica)
            try:
                snapshots.check_snapshot_dir(self.snapshot_dir, self._identity())
            except snapshots.SnapshotMismatch as err:
                problem = str(err)
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise snapshots.SnapshotMismatch(problem)
        self._wrap_process_dataloader(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            vars(self._wrapped).pop("process_dataloader", None)  # the class's method again
            self._wrapped = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restored, self._restored = self._restored, None
        self._stopped_in = None
        if restored is not None:
            self._rng_base = int(restored["rng_base"])
            self._initial_fingerprint = restored.get("initial_fingerprint")
            self._recipe = resumed_recipe(
                restored.get("recipe"), self._training_recipe(trainer, pl_module)
            )
            set_rng_states(restored["rng"])
            self._complete_epoch = restored.get("complete_epoch")
            if self._complete_epoch is not None:
                self._write_missing_snapshot(trainer, pl_module, self._complete_epoch)
            return
        # the seed each pass derives from: rank 0's, as in DataOrderEnsemble.on_train_start
        self._rng_base = int(trainer.strategy.broadcast(torch.initial_seed()))
        state = snapshots_state(trainer)
        problem = None
        if trainer.is_global_zero:
            self._initial_fingerprint = snapshots.state_fingerprint(state)
            self._recipe = self._training_recipe(trainer, pl_module)
            run = {
                **self._identity(),
                "initial_fingerprint": self._initial_fingerprint,
                "recipe": self._recipe,
            }
            try:
                snapshots.check_snapshot_dir(self.snapshot_dir, run)
            except snapshots.SnapshotMismatch as err:
                problem = str(err)
            else:
                if self.save_initial and self.replica == 0:
                    self._write(pl_module, state, self.snapshot_dir / "initial", epoch=None)
        self._initial_fingerprint = trainer.strategy.broadcast(self._initial_fingerprint)
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise snapshots.SnapshotMismatch(problem)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._complete_epoch = None
        if batch_idx == 0:  # the replica's pass over this epoch begins
            seed_replica_pass(self._rng_base, self.seed, trainer.current_epoch, self.replica)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        last = batch_idx == trainer.num_training_batches - 1
        self._stopped_in = None if last else trainer.current_epoch
        if last:
            self._complete_epoch = trainer.current_epoch
            self._write_epoch(trainer, pl_module, trainer.current_epoch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stopped_in is not None:
            rank_zero_warn(
                f"ReplicaJob: training stopped inside epoch {self._stopped_in} (max_steps, "
                f"max_time or a stop), so replica {self.replica} has no snapshot of it; "
                "resume from a checkpoint to finish the epoch, or bound the fit with max_epochs."
            )

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._identity(),
            "rng_base": self._rng_base,
            "rng": rng_states(),
            "initial_fingerprint": self._initial_fingerprint,
            "recipe": self._recipe,
            "complete_epoch": self._complete_epoch,
            "snapshot_dir": str(self.snapshot_dir.resolve()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in self._identity().items():
            if state_dict.get(key) != value:
                raise MisconfigurationException(
                    f"ReplicaJob: the checkpoint was saved by a replica job with {key}="
                    f"{state_dict.get(key)!r}, this one has {key}={value!r}; resume replica "
                    f"{self.replica} from its own checkpoint (its logger version "
                    f"{self.logger_version} holds them), or start it without ckpt_path."
                )
        saved_dir = state_dict.get("snapshot_dir")
        if saved_dir is not None and _elsewhere(Path(saved_dir), self.snapshot_dir):
            raise MisconfigurationException(
                f"ReplicaJob: the checkpoint is of a job writing its snapshots to {saved_dir}, "
                f"this one writes to {self.snapshot_dir.resolve()}: resuming would not write "
                "them there (a finished fit resumes to nothing). Resume with that snapshot_dir, "
                "or start this job without ckpt_path."
            )
        self._restored = dict(state_dict)

    # -- internals ------------------------------------------------------------------------
    def _wrap_process_dataloader(self, trainer: Trainer) -> None:
        strategy = trainer.strategy
        original = type(strategy).process_dataloader.__get__(strategy)

        def process_dataloader(dataloader: object) -> object:
            dataloader = original(dataloader)
            state = trainer.state
            if state.fn == TrainerFn.FITTING and state.stage == RunningStage.TRAINING:
                return self._replica_loader(trainer, dataloader)
            return dataloader

        strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]
        self._wrapped = strategy

    def _replica_loader(self, trainer: Trainer, dataloader: object) -> ResumableLoader:
        if not isinstance(dataloader, DataLoader):
            raise MisconfigurationException(
                "ReplicaJob needs a torch DataLoader as the train dataloader (got "
                f"{type(dataloader).__name__}); it replaces its sampler."
            )
        if isinstance(dataloader.dataset, IterableDataset):
            raise MisconfigurationException(
                "ReplicaJob: the train dataset is an IterableDataset, which has no order to "
                "permute; use a map-style dataset (with __len__ and __getitem__)."
            )
        batch_size = dataloader.batch_size
        if batch_size is None:
            batch_size = getattr(dataloader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise MisconfigurationException(
                "ReplicaJob: the train DataLoader has no batch_size; give it one, e.g. "
                "DataLoader(dataset, batch_size=32)."
            )
        drop_last = bool(getattr(dataloader.batch_sampler, "drop_last", dataloader.drop_last))
        shards = dict(getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {})
        num_shards, shard_rank = int(shards.get("num_replicas", 1)), int(shards.get("rank", 0))
        step_samples = None
        if self.fixed_batches:
            if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
                raise MisconfigurationException(
                    "ReplicaJob(fixed_batches=True) fixes the samples of each optimizer step, "
                    "whose number a GradientAccumulationScheduler changes between epochs; use a "
                    "constant accumulate_grad_batches with fixed_batches."
                )
            step_samples = batch_size * num_shards * trainer.accumulate_grad_batches
        orders = DataOrderSampler(
            dataloader.dataset,
            seed=self.seed,
            replica=self.replica,
            fixed_batches=self.fixed_batches,
            batch_size=step_samples,
        )
        sampler = EnsembleBatchSampler(
            orders,
            self.num_replicas,
            batch_size,
            drop_last,
            replicas=[self.replica],
            num_shards=num_shards,
            shard_rank=shard_rank,
        )
        if sampler.batches_per_replica == 0:
            raise MisconfigurationException(
                "ReplicaJob: the replica gets 0 training batches; use a smaller batch_size or "
                "drop_last=False."
            )
        self.batch_sampler = sampler
        return resumable_loader(dataloader, sampler, trainer, loader_class=_ReplicaLoader)

    def _record(self, trainer: Trainer, epoch: int | None) -> dict[str, Any]:
        return {
            "format": snapshots.RECORD_FORMAT,
            **self._identity(),
            "epoch": epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "initial_fingerprint": self._initial_fingerprint,
            "recipe": self._recipe,
        }

    def _training_recipe(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        sampler = self.batch_sampler  # built with the train loader, before on_train_start
        data = None
        if sampler is not None:
            data = {
                "size": len(sampler.sampler),
                "batch_size": sampler.batch_size,
                "drop_last": bool(sampler.drop_last),
                # ranks training the replica's batches side by side, and each one's batches
                "ranks": sampler.num_shards,
                "batches_per_epoch": trainer.num_training_batches,
            }
        return training_recipe(trainer, pl_module, data)

    def _write(
        self,
        pl_module: LightningModule,
        state: Mapping[str, torch.Tensor],
        target: Path,
        epoch: int | None,
    ) -> None:
        trainer = pl_module.trainer
        record = self._record(trainer, epoch)
        if epoch is None:  # the initial weights
            record = {k: v for k, v in record.items() if k not in ("replica", "global_step")}
        pretrained = snapshots.pretrained_model(pl_module, state)
        tokenizer = getattr(pl_module, "tokenizer", None) if pretrained is not None else None
        if pretrained is not None:
            record["draw_prefix"] = snapshots.PRETRAINED_PREFIX
        tensors = snapshots.snapshot_tensors(pl_module, state)
        snapshots.write_snapshot(target, tensors, record, pretrained, tokenizer)

    def _write_epoch(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        state = snapshots_state(trainer)  # a collective under FSDP: every rank calls it
        if not trainer.is_global_zero:
            return
        directory = snapshots.epoch_dir(self.snapshot_dir, epoch)
        shared = {k: v for k, v in self._identity().items() if k != "replica"}
        if snapshots.pretrained_model(pl_module, state) is not None:
            # the merge keys its draws by "model." + the directory's names, as in-process
            shared["draw_prefix"] = snapshots.PRETRAINED_PREFIX
        snapshots.write_epoch_record(directory, {**shared, "epoch": epoch})
        self._write(pl_module, state, directory / f"replica_{self.replica:03d}", epoch)

    def _write_missing_snapshot(
        self, trainer: Trainer, pl_module: LightningModule, epoch: int
    ) -> None:
        """Resumed from a checkpoint saved after ``epoch``'s last batch: write that epoch's
        snapshot if the killed job had not (the weights have not changed since)."""
        target = snapshots.epoch_dir(self.snapshot_dir, epoch) / f"replica_{self.replica:03d}"
        missing = trainer.strategy.broadcast(snapshots.find_snapshot(target) is None)
        if missing:
            self._write_epoch(trainer, pl_module, epoch)


def _elsewhere(saved: Path, snapshot_dir: Path) -> bool:
    """Whether a checkpoint's job wrote to another existing directory than ``snapshot_dir``
    (one moved, or mounted under another path on this node, no longer exists as saved)."""
    if not saved.is_dir():
        return False
    return not snapshot_dir.is_dir() or not os.path.samefile(saved, snapshot_dir)


def snapshots_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The LightningModule's full state dict on global rank 0 ({} elsewhere under FSDP).

    Sharded strategies (FSDP, ``ModelParallelStrategy``) are gathered with torch's
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``; other strategies return
    ``lightning_module_state_dict()``, as Lightning's checkpointing does.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(strategy.model, options=options)
    return strategy.lightning_module_state_dict()
