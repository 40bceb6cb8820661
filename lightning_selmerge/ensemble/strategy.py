"""``DataOrderEnsemble``: train K replicas one after another inside each Lightning epoch.

The class is the fit's lifecycle; each job has its module: ranks and collectives
(:mod:`.parallel`, the base class's base), :mod:`.trainer_checks`, :mod:`.rng`, :mod:`.loader`,
:mod:`.replica_swap`, the checkpoints (:mod:`.ensemble_checkpoints`, :mod:`.checkpoint_format`),
:mod:`.replica_merge` and what the monitor is told (:mod:`.probe_schedule`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from lightning_selmerge.ensemble import device_groups, replica_merge, trainer_checks
from lightning_selmerge.ensemble.checkpoint_format import CHECKPOINT_KEY
from lightning_selmerge.ensemble.ensemble_checkpoints import EnsembleCheckpoints
from lightning_selmerge.ensemble.loader import ensemble_loader
from lightning_selmerge.ensemble.parallel import StartMethod
from lightning_selmerge.ensemble.probe_schedule import ProbeSchedule
from lightning_selmerge.ensemble.replica_store import (
    Offload,
    ReplicaState,
    ReplicaStore,
    cpu_state_copy,
)
from lightning_selmerge.ensemble.replica_swap import ReplicaSwap
from lightning_selmerge.ensemble.rng import seed_replica_pass, set_rng_states
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler
from lightning_selmerge.merging import MergeMethod, MergeRule, NonFinite

__all__ = ["CHECKPOINT_KEY", "DataOrderEnsemble", "ReplicaState", "cpu_state_copy"]


class DataOrderEnsemble(ProbeSchedule, EnsembleCheckpoints):
    """Train ``num_replicas`` copies of the module, each on its own data order, in one fit.

    In every epoch the train loader yields replica 0's order (``DataOrderSampler.order(epoch,
    0)``) in batches, then replica 1's, and so on; at each replica boundary the strategy stores
    the finished replica's parameters, buffers, optimizer and step-interval LR-scheduler states
    and loads the next one's. Inactive replicas live in CPU memory (``pin_memory=True``: page-
    locked, for faster GPU copies) or, with ``offload="disk"``, in safetensors files under
    ``offload_dir`` (a temporary directory by default). All replicas start from the module's
    weights at fit start. The train loader's own sampler is replaced (its dataset, batch size,
    ``drop_last``, collate function and workers are kept); an ``int`` ``limit_train_batches``
    applies per replica. Pair it with
    :class:`~lightning_selmerge.ensemble.SelectionMergeCallback` to merge.

    **Device groups.** On ``devices x num_nodes = R x G`` ranks the ranks form a
    ``("replica", "shard")`` device mesh: each of the R replica groups trains ``K / R`` of the
    replicas (one after another, as above), each sharded with FSDP2 ``fully_shard`` over the
    group's ``G = shard_size`` ranks, with no gradient sync across groups. Rank 0's initial
    weights are broadcast so that every replica starts identical. A replica's batches are dealt
    round-robin to its shard ranks (see :class:`EnsembleBatchSampler`); validation data is split
    over the shard ranks only, so every group validates on all of it. The merge is a collective
    over the replica dimension, bit-identical to the single-process merge. Lightning's launchers
    are used as for DDP (``start_method``: ``"popen"`` re-runs the script, ``"spawn"``/``"fork"``;
    torchrun and SLURM start the processes themselves).

    Checkpoints carry every replica's state, the initial weights, the active replica, the RNG
    states and the position in the epoch (under ``checkpoint["data_order_ensemble"]`` and the
    fit loop's loader state), so ``trainer.fit(..., ckpt_path=...)`` continues exactly, also
    from a checkpoint saved in the middle of an epoch. ``checkpoint["state_dict"]`` is left to
    the merge callback (the merged model); the live replica's weights are stored under this
    strategy's key. On several ranks a checkpoint is a directory: ``checkpoint.pt`` (rank 0's
    Lightning checkpoint, whose ``state_dict`` is the full merged model) and one
    ``rank_{r}.pt`` per rank with that rank's slices of its replicas (per-replica files, not
    distributed checkpoint, which would de-duplicate the replicas). It is written under a
    temporary name and renamed when every rank is done; resuming needs the same layout.

    A single-file checkpoint may go to a remote path (``"s3://..."``: Lightning's checkpoint IO
    writes it); a local one is written atomically. The per-rank directory needs a local (or
    mounted) path: a remote one is refused.

    Refused: ``num_replicas < 2``, ``val_check_interval != 1.0``, a float
    ``limit_train_batches`` other than 1.0, ``overfit_batches``, iterable datasets, several
    train dataloaders, an ``accumulate_grad_batches`` that does not divide the batches per
    replica (in any epoch of a ``GradientAccumulationScheduler``'s schedule too), a
    ``max_steps`` that would stop inside an epoch under automatic optimization (the later
    replicas would miss part of it: bound the fit with ``max_epochs`` and an int
    ``limit_train_batches``), Lightning's tuners (``lr_find``, ``scale_batch_size``: tune one
    model with a plain strategy), a number of ranks that
    ``shard_size`` does not divide, and ``num_replicas`` not a multiple of the replica groups.
    Epoch-interval LR schedulers are shared (every replica sees the same epoch schedule, and a
    ``ReduceLROnPlateau`` follows the validated, i.e. merged, metric); step-interval ones are
    per replica (on one optimizer with both, e.g. a warmup and a plateau decay, a replica's
    learning rate is its own step schedule's times the shared one's), and so is a
    mixed-precision loss scaler (fp16's ``GradScaler``: each replica backs off from its own
    overflows). Under manual optimization
    (``automatic_optimization = False``) every LR scheduler is per replica, swapped with it:
    step it during the replica's batches (``training_step`` or ``on_train_batch_end``); a step
    in an epoch-end hook reaches only the replica live then.

    **Schedule lengths.** ``trainer.estimated_stepping_batches`` counts the optimizer steps of
    all the replicas one rank trains (``K / R`` of them) together. A per-replica (step-interval)
    schedule that should span the fit takes :meth:`steps_per_replica` instead, e.g.
    ``LinearLR(opt, 1.0, 0.0, total_iters=self.trainer.strategy.steps_per_replica())`` in
    ``configure_optimizers``. Under manual optimization it counts the replica's batches, and a
    ``max_steps`` (Lightning's count of every optimizer's steps) needs
    ``steps_per_replica(optimizer_steps_per_batch=N)``.

    Each replica's pass over an epoch starts from torch, python and numpy RNG
    states derived from (the seed at fit start, ``seed``, epoch, replica), so its dropout and
    other randomness do not depend on what ran before it, on which rank trains it, or on a
    resume in between.

    Args:
        num_replicas: K >= 2.
        seed: seed of the replicas' data orders.
        fixed_batches: every replica sees the same batches, in its own order (paper Table 4):
            the samples of each optimizer step (``batch_size x shard_size x
            accumulate_grad_batches``) are fixed, the order of the steps is the replica's.
        offload: where inactive replicas live: ``"cpu"`` memory or ``"disk"``.
        pin_memory: page-locked CPU copies (with a GPU).
        offload_dir: directory of ``offload="disk"`` (default: a temporary one).
        shard_size: G, the ranks each replica is sharded over (FSDP2); 1 = no sharding.
        shard_modules: class names of the submodules that get their own FSDP2 unit (default:
            the ``_no_split_modules`` of the Hugging Face models inside, e.g. the transformer
            blocks); every direct child with parameters is sharded too.
        start_method: how Lightning starts the ranks: ``"popen"``, ``"spawn"``, ``"fork"``,
            ``"forkserver"``.
        process_group_backend: ``"gloo"``/``"nccl"`` (default: by device).
        timeout: collective timeout.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(strategy=DataOrderEnsemble(num_replicas=4, seed=0),
        ...                   accelerator="cpu", devices=1, logger=False)
    """

    strategy_name = "data_order_ensemble"

    def __init__(
        self,
        num_replicas: int = 2,
        seed: int = 0,
        fixed_batches: bool = False,
        offload: Offload = "cpu",
        pin_memory: bool = False,
        offload_dir: str | None = None,
        shard_size: int = 1,
        shard_modules: list[str] | None = None,
        start_method: StartMethod = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        trainer_checks.check_num_replicas(num_replicas)
        trainer_checks.check_offload(offload)
        super().__init__(
            num_replicas,
            shard_size=shard_size,
            shard_modules=shard_modules,
            start_method=start_method,
            process_group_backend=process_group_backend,
            timeout=timeout,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.seed = int(seed)
        self.fixed_batches = fixed_batches
        self.offload = offload
        self.batch_sampler: EnsembleBatchSampler | None = None
        self._fixed_step_samples: int | None = None  # samples of a fixed optimizer step
        self._resumed_step_samples: Any = None  # the checkpoint's, when resuming
        self._pin_memory, self._offload_dir = pin_memory, offload_dir
        store = ReplicaStore(self.num_replicas, offload, pin_memory, offload_dir)
        self._swap = ReplicaSwap(self, store, load=partial(_load_replica, self))
        self._to_restore: dict[str, Any] | None = None
        self._rng_base = 0
        self._per_replica_limit: int | None = None
        self._saved_limit: int | float | None = None
        self._rank_offload_dir: Path | None = None  # the per-rank store's, once made

    def setup_environment(self) -> None:
        super().setup_environment()  # ranks, layout, process group and device mesh
        if self.is_distributed and self._offload_dir is not None:
            # the ranks of a group hold slices of the same replicas: one directory per rank,
            # made once (every run calls this: a validate after the fit keeps its replicas)
            own = Path(self._offload_dir) / f"rank_{self.global_rank:05d}"
            if own != self._rank_offload_dir:
                store = ReplicaStore(self.num_replicas, self.offload, self._pin_memory, own)
                self._swap.store, self._rank_offload_dir = store, own

    # -- public view ----------------------------------------------------------------------
    @property
    def active_replica(self) -> int:
        """The replica whose weights the live module holds (during training).

        The strategy switches replicas in its ``on_train_batch_start``, which Lightning calls
        after the callbacks' and the module's: there, at a replica's first batch, this is still
        the previous replica; ``replica_of(batch_idx)`` names the batch's own.
        """
        return self._swap.active

    @property
    def batches_per_replica(self) -> int:
        """Training batches of each replica per epoch (known once the train loader is set)."""
        if self.batch_sampler is None:
            raise RuntimeError("DataOrderEnsemble: the train dataloader is not set up yet.")
        return self.batch_sampler.batches_per_replica

    def steps_per_replica(self, optimizer_steps_per_batch: int | None = None) -> int | float:
        """Optimizer steps ONE replica takes over the fit (``inf`` when the fit has no bound).

        What a per-replica LR schedule spanning the fit needs, where Lightning's
        ``estimated_stepping_batches`` counts the steps of all the replicas this rank trains.
        Follows ``max_epochs``, ``max_steps``, ``accumulate_grad_batches`` (and a
        ``GradientAccumulationScheduler``) and an int ``limit_train_batches``; under manual
        optimization, the replica's batches. Call it during the fit (e.g. in
        ``configure_optimizers``): it sets up the train dataloader if needed, as
        ``estimated_stepping_batches`` does.

        Args:
            optimizer_steps_per_batch: under manual optimization with a ``max_steps``, the
                ``optimizer.step()`` calls one training batch makes, all optimizers together
                (Lightning counts ``max_steps`` in them): 2 for two optimizers each stepping
                once a batch. Refused when needed and not given.
        """
        module = self._lightning_module
        if module is None or module._trainer is None:
            raise RuntimeError(
                "DataOrderEnsemble.steps_per_replica() needs the fit's trainer; call it during "
                "trainer.fit (e.g. in configure_optimizers)."
            )
        trainer, batches = module.trainer, None
        if trainer.max_epochs not in (None, -1):
            if self.batch_sampler is None:
                trainer.fit_loop.setup_data()  # calls process_dataloader
            batches = self.batches_per_replica
        local = len(self._layout.local_replicas)
        return trainer_checks.steps_per_replica(trainer, local, batches, optimizer_steps_per_batch)

    @property
    def initial_state(self) -> ReplicaState:
        """The state every replica started from (the module at fit start): the merge's base.

        With sharding, tensors are this rank's slices (as in every state the strategy holds).
        """
        return self._swap.initial_state

    def replica_of(self, batch_idx: int) -> int:
        """The replica that training batch ``batch_idx`` of an epoch belongs to."""
        if self.batch_sampler is None:
            raise RuntimeError("DataOrderEnsemble: the train dataloader is not set up yet.")
        return self.batch_sampler.replica_of(batch_idx)

    def replica_state(self, replica: int) -> ReplicaState:
        """Replica ``replica``'s full state (module, optimizers, schedulers), as CPU copies."""
        if replica not in self._layout.local_replicas:
            raise ValueError(
                f"DataOrderEnsemble: replica {replica} is trained by replica group "
                f"{replica // len(self._layout.local_replicas)}, not by this rank's group "
                f"({self._layout.local_replicas})."
            )
        return self._swap.state_of(replica)

    def local_replica_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """``{replica: module state}`` of the replicas this rank holds (all K on one device)."""
        return {k: self.replica_state(k).module for k in self._layout.local_replicas}

    def replica_states(self) -> list[dict[str, torch.Tensor]]:
        """The K replicas' module state dicts (the active one copied from the live module)."""
        if self.is_distributed:
            raise RuntimeError(
                "DataOrderEnsemble: on several ranks each rank holds only its group's replicas; "
                "use local_replica_states() (and merge_replicas() for the merge)."
            )
        return [self.replica_state(k).module for k in range(self.num_replicas)]

    def merge_replicas(
        self,
        method: MergeMethod,
        rules: Sequence[MergeRule] = (),
        seed: int = 0,
        nonfinite: NonFinite = "error",
        on_device: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Merge the K replicas; on several ranks a collective over the replica dimension.

        Returns this rank's slice of the merge (the whole merge without sharding). On one device
        with the module on an accelerator and ``on_device``, the replicas are merged there
        (streamed from host memory) and the merged tensors live there; else on the CPU. The
        bits are the same (see :func:`~lightning_selmerge.merging.device_stream.exact_on`).
        ``nonfinite``: a replica holding NaN/Inf raises :class:`NonFiniteError` (``"error"``) or
        is left out of the merge (``"drop"``, one device only).
        """
        shared = self._swap.shared_now()  # frozen: the same in every replica, taken as it is
        initial = self.initial_state.module
        if not self.is_distributed:
            states = self.replica_states()
            device = self.root_device if on_device else None
            return replica_merge.merge_in_memory(
                states, initial, shared, method, rules, seed, nonfinite, device
            )
        return replica_merge.merge_over_groups(
            self.local_replica_states(),
            initial,
            shared,
            method,
            rules,
            seed,
            nonfinite,
            num_replicas=self.num_replicas,
            group=self._mesh["replica"].get_group(),
            offsets=self._offsets,
            device=self.root_device if self.process_group_backend == "nccl" else None,
        )

    def gather_replica_metrics(
        self, metrics: Mapping[int, Mapping[str, float]]
    ) -> dict[int, dict[str, float]]:
        """Every replica's metrics on every rank, from each rank's metrics of its replicas."""
        if not self.is_distributed:
            return {k: dict(v) for k, v in metrics.items()}
        names = sorted({name for values in metrics.values() for name in values})
        return device_groups.reduce_replica_values(metrics, self._layout, self.root_device, names)

    def release_live(self) -> None:
        """Store the live replica so the module may hold other weights (e.g. the merged ones)."""
        self._swap.release_live()

    def reset_replicas(self, module_state: Mapping[str, torch.Tensor]) -> None:
        """Set every replica's weights to ``module_state``; optimizer states are kept."""
        if any(t.device.type != "cpu" for t in module_state.values()):  # merged on the device
            store = self._swap.store
            module_state = cpu_state_copy(dict(module_state), store.pin_memory, store.shared)
        self._swap.reset(module_state, self._layout.local_replicas)

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        # before super().setup: configure_optimizers may already set up the train loader
        # (estimated_stepping_batches, steps_per_replica), which must see these settings
        if trainer.state.fn == TrainerFn.FITTING:
            trainer_checks.check_trainer(trainer)
            trainer_checks.warn_without_merge(trainer, self.num_replicas)
            self.batch_sampler = None  # steps_per_replica() must not read an earlier fit's
            local = len(self._layout.local_replicas)  # the replicas this rank trains
            self._per_replica_limit = trainer_checks.per_replica_limit(trainer, local)
            if self._per_replica_limit is not None:  # restored at teardown
                self._saved_limit = self._per_replica_limit
        super().setup(trainer)

    def teardown(self) -> None:
        self.end_untrained_resume()
        module = self._lightning_module
        if self._saved_limit is not None and module is not None and module._trainer is not None:
            module.trainer.limit_train_batches = self._saved_limit
        self._saved_limit = None
        self._to_restore = None
        self._resumed_step_samples = None
        super().teardown()

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING:
            trainer_checks.warn_padded_evaluation(dataloader, self.shard_size)
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        loader, self._fixed_step_samples = ensemble_loader(
            dataloader,
            trainer,
            self._layout,
            seed=self.seed,
            fixed_batches=self.fixed_batches,
            per_replica_limit=self._per_replica_limit,
            resumed_step_samples=self._resumed_step_samples,
        )
        self.batch_sampler = loader.batch_sampler
        self._check_stepping(trainer)
        return loader

    def on_train_start(self) -> None:
        super().on_train_start()
        trainer_checks.check_one_train_loader(self.lightning_module.trainer)
        trainer_checks.set_scheduled_accumulation(self.lightning_module.trainer)
        # steps_per_replica() (or estimated_stepping_batches) in configure_optimizers sets the
        # train loader up before Lightning reads a checkpoint's position in the epoch, and
        # Lightning applies that position only where it builds the loader: apply it now
        fit_loop = self.lightning_module.trainer.fit_loop
        getattr(fit_loop, "_load_combined_loader_states", lambda: None)()
        trainer_checks.check_initialized(self.lightning_module)
        saved, self._to_restore = self._to_restore, None
        self._resumed_model = None  # training runs: the callbacks say what the module ends with
        if saved is None:
            # the seed the replicas' passes derive from: rank 0's, so any layout draws alike
            self._rng_base = int(self.broadcast(torch.initial_seed()))
            self._swap.start(first=self._layout.local_replicas[0])
            return
        self._swap.restore(saved, load_live=self.is_distributed)
        set_rng_states(saved["rng"])
        self._rng_base = int(saved.get("rng_base", 0))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._check_stepping(self.lightning_module.trainer, batch_idx)
        if batch_idx % self.batches_per_replica == 0:  # a replica's pass begins
            epoch = self.lightning_module.trainer.current_epoch
            seed_replica_pass(self._rng_base, self.seed, epoch, self.replica_of(batch_idx))
        self._swap.make_live(self.replica_of(batch_idx))

    # -- internals ------------------------------------------------------------------------
    def _load(self, state: ReplicaState) -> None:
        """Load a replica's state into the live module (every switch and resume comes here)."""
        self._swap.load(state)

    def _check_stepping(self, trainer: Any, batch_idx: int | None = None) -> None:
        """:func:`trainer_checks.check_stepping` for the replicas this rank trains."""
        trainer_checks.check_stepping(
            trainer, self.batches_per_replica, len(self._layout.local_replicas), batch_idx
        )


def _load_replica(strategy: DataOrderEnsemble, state: ReplicaState) -> None:
    strategy._load(state)  # looked up at each call (a test fails it halfway); picklable (spawn)
