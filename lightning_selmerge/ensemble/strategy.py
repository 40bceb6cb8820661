"""``DataOrderEnsemble``: train K replicas one after another inside each Lightning epoch."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH, ReduceOp
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import (
    _MultiProcessingLauncher,
    _SubprocessScriptLauncher,
)
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from lightning_selmerge.ensemble import device_groups, process_groups, trainer_checks
from lightning_selmerge.ensemble.checkpoint_format import (
    CHECKPOINT_KEY,
    check_compatible,
    rank_file,
    save_atomic,
    save_rank_directory,
)
from lightning_selmerge.ensemble.device_groups import ReplicaLayout
from lightning_selmerge.ensemble.loader import (
    BY_BATCH_SIZE,
    ensemble_batch_sampler,
    fixed_step_samples,
    resumable_loader,
    train_batch_size,
)
from lightning_selmerge.ensemble.replica_store import (
    Offload,
    ReplicaState,
    ReplicaStore,
    cpu_state_copy,
)
from lightning_selmerge.ensemble.rng import rng_states as _rng_states
from lightning_selmerge.ensemble.rng import seed_replica_pass as _seed_replica_pass
from lightning_selmerge.ensemble.rng import set_rng_states as _set_rng_states
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler
from lightning_selmerge.imbalance.replicas import ProbeTarget
from lightning_selmerge.merging import (
    MergeMethod,
    MergeRule,
    NonFinite,
    NonFiniteError,
    find_nonfinite,
    merge_state_dicts,
)
from lightning_selmerge.merging.collective import merge_state_dicts_collective
from lightning_selmerge.merging.leftovers import recover_output

__all__ = ["CHECKPOINT_KEY", "DataOrderEnsemble", "ReplicaState", "cpu_state_copy"]


class DataOrderEnsemble(ParallelStrategy):
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
    ``limit_train_batches`` other than 1.0, ``overfit_batches``, iterable datasets, an
    ``accumulate_grad_batches`` that does not divide the batches per replica (in any epoch of a
    ``GradientAccumulationScheduler``'s schedule too), a ``max_steps`` that would stop inside an
    epoch under automatic optimization (the later replicas would miss part of it: bound the fit
    with ``max_epochs`` and an int ``limit_train_batches``), Lightning's tuners (``lr_find``,
    ``scale_batch_size``: tune one model with a plain strategy), a number of ranks that
    ``shard_size`` does not divide, and ``num_replicas`` not a multiple of the replica groups.
    Epoch-interval LR schedulers are shared (every replica sees the same epoch schedule, and a
    ``ReduceLROnPlateau`` follows the validated, i.e. merged, metric); step-interval ones are
    per replica, and so is a mixed-precision loss scaler (fp16's ``GradScaler``: each replica
    backs off from its own overflows). Under manual optimization
    (``automatic_optimization = False``) every LR scheduler is per replica, swapped with it:
    step it during the replica's batches (``training_step`` or ``on_train_batch_end``); a step
    in an epoch-end hook reaches only the replica live then.

    **Schedule lengths.** ``trainer.estimated_stepping_batches`` counts the optimizer steps of
    all the replicas one rank trains (``K / R`` of them) together. A per-replica (step-interval)
    schedule that should span the fit takes :meth:`steps_per_replica` instead, e.g.
    ``LinearLR(opt, 1.0, 0.0, total_iters=self.trainer.strategy.steps_per_replica())`` in
    ``configure_optimizers``.

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
    #: set by ``SelectionMergeCallback``: the latest merge (whole on global rank 0; ``None``
    #: before the first), which a weights-only checkpoint stores as ``state_dict``.
    weights_only_state: Callable[[], dict[str, torch.Tensor] | None] | None = None

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
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        trainer_checks.check_num_replicas(num_replicas)
        if offload not in ("cpu", "disk"):
            raise ValueError(
                f"DataOrderEnsemble: offload={offload!r}; use 'cpu' (inactive replicas in CPU "
                "memory) or 'disk' (in safetensors files under offload_dir)."
            )
        if int(shard_size) < 1:
            raise ValueError(
                f"DataOrderEnsemble: shard_size={shard_size}; use 1 (each replica on one device) "
                "or the number of devices each replica is sharded over."
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.num_replicas = int(num_replicas)
        self.seed = int(seed)
        self.fixed_batches = fixed_batches
        self.offload = offload
        self.shard_size = int(shard_size)
        self.shard_modules = None if shard_modules is None else list(shard_modules)
        self._start_method = start_method
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._num_nodes = 1
        self.batch_sampler: EnsembleBatchSampler | None = None
        self._fixed_step_samples: int | None = None  # samples of a fixed optimizer step
        self._resumed_step_samples: Any = None  # the checkpoint's, when resuming
        self._pin_memory, self._offload_dir = pin_memory, offload_dir
        self._store = ReplicaStore(self.num_replicas, offload, pin_memory, offload_dir)
        self._layout = ReplicaLayout(self.num_replicas, 1, 1, 0)
        self._mesh: Any = None
        self._sharded = False
        self._offsets: dict[str, int] = {}
        self._active = 0
        self._live_is_replica = True
        self._initial: ReplicaState | None = None
        self._to_restore: dict[str, Any] | None = None
        self._rng_base = 0
        self._per_replica_limit: int | None = None
        self._saved_limit: int | float | None = None

    # -- processes and devices (as Lightning's DDPStrategy, without the DDP wrapper) --------
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        """Whether the ensemble runs on more than one rank."""
        return self.num_nodes * self.num_processes > 1

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # evaluation data is split over a replica's shard ranks: every replica group sees it all
        return {"num_replicas": self.shard_size, "rank": self._layout.shard_rank}

    @property
    def layout(self) -> ReplicaLayout:
        """This rank's replica group, shard and replicas (all K and shard 0 on one device)."""
        return self._layout

    @property
    def device_mesh(self) -> Any:
        """The ``("replica", "shard")`` device mesh (``None`` on one device)."""
        return self._mesh

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.is_distributed or self.cluster_environment.creates_processes_externally:
            self._launcher = None
        elif self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(
                self.node_rank * self.num_processes + self.local_rank
            )
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        self.set_world_ranks()
        world = self.num_nodes * self.num_processes
        self._layout = ReplicaLayout.for_world(
            self.num_replicas, world, self.shard_size, self.global_rank
        )
        if not self.is_distributed:
            return
        if self._offload_dir is not None:  # ranks of a group hold slices of the same replicas
            own = Path(self._offload_dir) / f"rank_{self.global_rank:05d}"
            self._store = ReplicaStore(self.num_replicas, self.offload, self._pin_memory, own)
        reset_seed()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device
        )
        self._process_group_backend = backend
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, backend, **kwargs)
        from torch.distributed.device_mesh import init_device_mesh

        self._mesh = init_device_mesh(
            self.root_device.type,
            (self._layout.replica_groups, self.shard_size),
            mesh_dim_names=("replica", "shard"),
        )
        # join the gloo worker threads before Python finalizes, or a worker releasing its last
        # collective then aborts the process (exit 134): see process_groups
        process_groups.release_at_exit(self._mesh)

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.is_distributed:
            return model
        with torch.no_grad():  # every replica starts from rank 0's weights
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        trainer = self.lightning_module.trainer
        if self.shard_size > 1 and trainer.state.fn == TrainerFn.FITTING:
            device_groups.shard_module(model, self._mesh["shard"], self.shard_modules)
            self._sharded = True
            self._offsets = device_groups.local_offsets(model.state_dict())
        return model

    def barrier(self, name: str | None = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    def reduce(
        self,
        tensor: torch.Tensor | Any,
        group: Any | None = None,
        reduce_op: ReduceOp | str | None = "mean",
    ) -> torch.Tensor | Any:
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # -- public view ----------------------------------------------------------------------
    @property
    def active_replica(self) -> int:
        """The replica whose weights the live module holds (during training).

        The strategy switches replicas in its ``on_train_batch_start``, which Lightning calls
        after the callbacks' and the module's: there, at a replica's first batch, this is still
        the previous replica; ``replica_of(batch_idx)`` names the batch's own.
        """
        return self._active

    @property
    def batches_per_replica(self) -> int:
        """Training batches of each replica per epoch (known once the train loader is set)."""
        if self.batch_sampler is None:
            raise RuntimeError("DataOrderEnsemble: the train dataloader is not set up yet.")
        return self.batch_sampler.batches_per_replica

    def steps_per_replica(self) -> int | float:
        """Optimizer steps ONE replica takes over the fit (``inf`` when the fit has no bound).

        What a per-replica LR schedule spanning the fit needs, where Lightning's
        ``estimated_stepping_batches`` counts the steps of all the replicas this rank trains.
        Follows ``max_epochs``, ``max_steps``, ``accumulate_grad_batches`` (and a
        ``GradientAccumulationScheduler``) and an int ``limit_train_batches``; under manual
        optimization, the replica's batches. Call it during the fit (e.g. in
        ``configure_optimizers``): it sets up the train dataloader if needed, as
        ``estimated_stepping_batches`` does.
        """
        module = self._lightning_module
        if module is None or module._trainer is None:
            raise RuntimeError(
                "DataOrderEnsemble.steps_per_replica() needs the fit's trainer; call it during "
                "trainer.fit (e.g. in configure_optimizers)."
            )
        trainer = module.trainer
        local = len(self._layout.local_replicas)
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        by_steps = math.inf if max_steps == -1 else -(-max_steps // local)
        if max_epochs is None or max_epochs == -1:
            return by_steps
        if self.batch_sampler is None:
            trainer.fit_loop.setup_data()  # calls process_dataloader
        if not trainer.lightning_module.automatic_optimization:
            return min(self.batches_per_replica * max_epochs, by_steps)
        scheduler = trainer_checks.accumulation_scheduler(trainer)
        batches = self.batches_per_replica
        total = sum(
            trainer_checks.replica_steps(trainer, batches, scheduler, epoch)
            for epoch in range(max_epochs)
        )
        return min(total, by_steps)

    @property
    def initial_state(self) -> ReplicaState:
        """The state every replica started from (the module at fit start): the merge's base.

        With sharding, tensors are this rank's slices (as in every state the strategy holds).
        """
        if self._initial is None:
            raise RuntimeError("DataOrderEnsemble: no initial state before training starts.")
        return self._initial

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
        if self._live_is_replica and replica == self._active:
            return self._capture()
        return self._store[replica] or self.initial_state

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
    ) -> dict[str, torch.Tensor]:
        """Merge the K replicas; on several ranks a collective over the replica dimension.

        Returns this rank's slice of the merge (the whole merge without sharding), on the CPU.
        ``nonfinite``: a replica holding NaN/Inf raises :class:`NonFiniteError` (``"error"``) or
        is left out of the merge (``"drop"``, one device only).
        """
        shared = self._shared_now()  # frozen: the same in every replica, taken as it is

        def trained(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: tensor for name, tensor in state.items() if name not in shared}

        base = trained(self.initial_state.module)
        order = list(self.initial_state.module)
        if not self.is_distributed:
            merged = merge_state_dicts(
                [trained(state) for state in self.replica_states()],
                base=base,
                method=method,
                rules=rules,
                seed=seed,
                nonfinite=nonfinite,
            )
            return {name: shared[name] if name in shared else merged[name] for name in order}
        local = {k: trained(state) for k, state in self.local_replica_states().items()}
        self._refuse_nonfinite(local, nonfinite)
        work = self.root_device if self.process_group_backend == "nccl" else None
        merged = merge_state_dicts_collective(
            local,
            num_replicas=self.num_replicas,
            group=self._mesh["replica"].get_group(),
            offsets=self._offsets,
            method=method,
            base=base,
            rules=rules,
            seed=seed,
            device=work,
        )
        return {name: shared[name] if name in shared else merged[name] for name in order}

    def _refuse_nonfinite(
        self, local: Mapping[int, Mapping[str, torch.Tensor]], nonfinite: NonFinite
    ) -> None:
        """On several ranks: every rank learns which replicas hold NaN/Inf, and all refuse."""
        indices = sorted(local)
        found = {
            indices[i]: name for i, name in find_nonfinite([local[k] for k in indices]).items()
        }
        everyone: list[dict[int, str] | None] = [None] * self.world_size
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

    def module_state(self) -> dict[str, torch.Tensor]:
        """CPU copy of the live module's state (this rank's slices when sharded)."""
        return cpu_state_copy(self.lightning_module.state_dict())

    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a state from :meth:`module_state` / :meth:`merge_replicas` into the module."""
        if self._sharded:
            device_groups.load_local_state(self.lightning_module, state)
        else:
            self.lightning_module.load_state_dict(state)

    def full_state(
        self, state: Mapping[str, torch.Tensor], rank: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Whole tensors from this rank's slices (a collective when sharded: call on all ranks).

        With ``rank``, only that global rank gets them and the others get ``{}``, so that a
        state only one rank writes (checkpoint, export) is not held whole by every rank.
        """
        keep = rank is None or rank == self.global_rank
        if not self._sharded:
            return dict(state) if keep else {}
        return device_groups.full_state(self.lightning_module.state_dict(), state, keep)

    def local_slices(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of whole tensors (the inverse of :meth:`full_state`)."""
        if not self._sharded:
            return dict(state)
        return device_groups.local_slices(self.lightning_module.state_dict(), state)

    def gather_replica_metrics(
        self, metrics: Mapping[int, Mapping[str, float]]
    ) -> dict[int, dict[str, float]]:
        """Every replica's metrics on every rank, from each rank's metrics of its replicas."""
        if not self.is_distributed:
            return {k: dict(v) for k, v in metrics.items()}
        names = sorted({name for values in metrics.values() for name in values})
        return device_groups.reduce_replica_values(metrics, self._layout, self.root_device, names)

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``all_reduce(SUM)`` over every rank (identity on one device)."""
        if not self.is_distributed:
            return tensor
        reduced = tensor.to(self.root_device)
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def release_live(self) -> None:
        """Store the live replica so the module may hold other weights (e.g. the merged ones)."""
        if self._live_is_replica and self._initial is not None:
            self._store[self._active] = self._capture()
            self._live_is_replica = False

    def reset_replicas(self, module_state: Mapping[str, torch.Tensor]) -> None:
        """Set every replica's weights to ``module_state``; optimizer states are kept."""
        for replica in self._layout.local_replicas:
            if self._live_is_replica and replica == self._active:
                self.load_module_state(module_state)
                continue
            old = self._store[replica] or self.initial_state
            self._store[replica] = ReplicaState(
                dict(module_state), old.optimizers, old.lr_schedulers, old.precision
            )

    # -- checkpoints ----------------------------------------------------------------------
    def ensemble_state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the ensemble exactly (saved in checkpoints)."""
        live: Any = None
        if self._live_is_replica:  # frozen tensors: the shared ones, which torch.save stores once
            shared = self._shared_now()
            live = (
                self._capture().to_dict()
                if self.is_distributed
                else cpu_state_copy(self.lightning_module.state_dict(), shared=shared)
            )
        return {
            **self._identity(),
            "active": self._active,
            "live": live,
            "replicas": [
                None if (state := self._store[k]) is None else state.to_dict()
                for k in range(self.num_replicas)
            ],
            "initial": self.initial_state.to_dict(),
            "rng": _rng_states(),
            "rng_base": self._rng_base,
        }

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._sharded:  # whole tensors on the rank that writes the checkpoint
            return self.full_state(self.module_state(), rank=0)
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self.is_distributed:  # every rank's optimizer states are in its rank file
            return {}
        return super().optimizer_state(optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.is_distributed and self._fitting():
            return  # restored from the rank file with the live replica
        super().load_optimizer_state_dict(checkpoint)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        full = "optimizer_states" in checkpoint and self._initial is not None  # not weights-only
        if "optimizer_states" not in checkpoint and self.weights_only_state is not None:
            merged = self.weights_only_state()  # a collective when sharded: every rank is here
            if merged is not None:  # the merge, not the replica live now (no resume state)
                checkpoint["state_dict"] = merged
        if not self.is_distributed:
            if full:
                checkpoint[CHECKPOINT_KEY] = self.ensemble_state_dict()
            local = "://" not in str(filepath)  # remote ("s3://...") paths go to checkpoint_io
            if local and type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None:
                if self.is_global_zero:
                    save_atomic(checkpoint, Path(filepath))
                return
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        state = self.ensemble_state_dict if full else None
        save_rank_directory(self, checkpoint, filepath, state, self._identity())

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict:
        path = Path(str(checkpoint_path))
        if "://" not in str(checkpoint_path) and not path.exists():
            recover_output(path)  # a per-rank directory a killed save left half swapped
        if path.is_dir():
            checkpoint = self.checkpoint_io.load_checkpoint(
                path / "checkpoint.pt", weights_only=False
            )
        else:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None or not self._fitting():
            return checkpoint
        self._check_compatible(saved, checkpoint_path)
        # checked against this fit's value when the loader is set up; checkpoints before it
        # was recorded grouped fixed batches by the DataLoader's batch_size
        self._resumed_step_samples = saved.get("fixed_step_samples", BY_BATCH_SIZE)
        if saved.get("per_rank_files"):
            own = rank_file(path, self.global_rank)
            self._to_restore = torch.load(own, map_location="cpu", weights_only=False)
        else:
            self._to_restore = saved
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and self._fitting():
            if saved.get("per_rank_files"):
                return  # each rank loads its live replica from its rank file at train start
            if saved["live"] is not None:
                # resuming: the module continues as the live replica, not as the merged model
                checkpoint = {**checkpoint, "state_dict": saved["live"]}
        super().load_model_state_dict(checkpoint, strict=strict)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)  # files and directories alike

    # -- what PositionLossMonitor is told (imbalance.ReplicaSchedule) --------------------
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

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        # before super().setup: configure_optimizers may already set up the train loader
        # (estimated_stepping_batches, steps_per_replica), which must see these settings
        if trainer.state.fn == TrainerFn.FITTING:
            trainer_checks.check_trainer(trainer)
            self.batch_sampler = None  # steps_per_replica() must not read an earlier fit's
            if trainer.fast_dev_run:  # its max_steps would stop inside replica 0: give each one
                steps = -(-int(trainer.fast_dev_run) // trainer.accumulate_grad_batches)
                local = len(self._layout.local_replicas)  # the replicas this rank trains
                trainer.fit_loop.epoch_loop.max_steps = steps * local
            limit = trainer.limit_train_batches
            self._per_replica_limit = None
            if isinstance(limit, int) and limit > 0:
                self._saved_limit, self._per_replica_limit = limit, limit
                trainer.limit_train_batches = 1.0  # the ensemble sampler applies it per replica
        super().setup(trainer)

    def teardown(self) -> None:
        module = self._lightning_module
        if self._saved_limit is not None and module is not None and module._trainer is not None:
            module.trainer.limit_train_batches = self._saved_limit
        self._saved_limit = None
        self._to_restore = None
        self._resumed_step_samples = None
        super().teardown()

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        batch_size, drop_last = train_batch_size(dataloader)
        assert isinstance(dataloader, DataLoader)
        step_samples = None  # with fixed_batches: the samples of one optimizer step, fixed
        if self.fixed_batches:
            resumed = self._resumed_step_samples
            step_samples = fixed_step_samples(trainer, batch_size, self.shard_size, resumed)
        self._fixed_step_samples = step_samples
        self.batch_sampler = ensemble_batch_sampler(
            dataloader.dataset,
            self.num_replicas,
            self._layout,
            seed=self.seed,
            fixed_batches=self.fixed_batches,
            step_samples=step_samples,
            batch_size=batch_size,
            drop_last=drop_last,
            per_replica_limit=self._per_replica_limit,
            shard_size=self.shard_size,
        )
        self._check_stepping(trainer)
        return resumable_loader(dataloader, self.batch_sampler, trainer)

    def on_train_start(self) -> None:
        super().on_train_start()
        saved, self._to_restore = self._to_restore, None
        if saved is None:
            # the seed the replicas' passes derive from: rank 0's, so any layout draws alike
            self._rng_base = int(self.broadcast(torch.initial_seed()))
            self._store.clear()
            self._store.share({})
            self._active = self._layout.local_replicas[0]
            self._live_is_replica = True
            self._initial = self._capture()
            self._share_frozen()
            return
        self._store.clear()
        self._initial = ReplicaState.from_dict(saved["initial"])
        self._share_frozen()
        for replica, state in enumerate(saved["replicas"]):
            self._store[replica] = None if state is None else ReplicaState.from_dict(state)
        self._active = int(saved["active"])
        self._live_is_replica = saved["live"] is not None
        if self.is_distributed and self._live_is_replica:
            self._load(ReplicaState.from_dict(saved["live"]))
        _set_rng_states(saved["rng"])
        self._rng_base = int(saved.get("rng_base", 0))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._check_stepping(self.lightning_module.trainer, batch_idx)
        if batch_idx % self.batches_per_replica == 0:  # a replica's pass begins
            epoch = self.lightning_module.trainer.current_epoch
            _seed_replica_pass(self._rng_base, self.seed, epoch, self.replica_of(batch_idx))
        target = self.replica_of(batch_idx)
        if target != self._active or not self._live_is_replica:
            self._switch_to(target)

    # -- internals ------------------------------------------------------------------------
    def _fitting(self) -> bool:
        module = self._lightning_module
        return (
            module is not None
            and module._trainer is not None
            and module.trainer.state.fn == TrainerFn.FITTING
        )

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (checked by :meth:`_check_compatible`)."""
        return {
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "fixed_batches": self.fixed_batches,
            "fixed_step_samples": self._fixed_step_samples,
            "layout": self._layout.to_dict(),
        }

    def _check_compatible(self, saved: Mapping[str, Any], path: _PATH) -> None:
        settings = {name: getattr(self, name) for name in ("num_replicas", "seed", "fixed_batches")}
        check_compatible(saved, path, self._layout, self.shard_size, settings)

    def _check_stepping(self, trainer: Any, batch_idx: int | None = None) -> None:
        """:func:`trainer_checks.check_stepping` for the replicas this rank trains."""
        trainer_checks.check_stepping(
            trainer, self.batches_per_replica, len(self._layout.local_replicas), batch_idx
        )

    def _step_schedulers(self) -> list[Any]:
        """The LR schedulers swapped with their replica: step-interval ones, and every one under
        manual optimization (Lightning steps none there; the user steps them in the batches)."""
        module = self.lightning_module
        configs = module.trainer.lr_scheduler_configs
        manual = not module.automatic_optimization
        return [cfg.scheduler for cfg in configs if manual or cfg.interval == "step"]

    def _frozen_names(self) -> set[str]:
        """State-dict names of the module's parameters that do not train now."""
        params = self.lightning_module.named_parameters(remove_duplicate=False)
        return {name for name, param in params if not param.requires_grad}

    def _share_frozen(self) -> None:
        """Hold the frozen parameters once for all replicas: the initial state's tensors."""
        assert self._initial is not None
        initial = self._initial.module
        self._store.share({n: initial[n] for n in self._frozen_names() if n in initial})

    def _shared_now(self) -> dict[str, torch.Tensor]:
        """The shared tensors of parameters still frozen; one unfrozen since (e.g. by
        ``BaseFinetuning``) is no longer shared: each replica trains its own from here on."""
        shared = self._store.shared
        if shared:
            self._store.unshare(set(shared) - self._frozen_names())
        return self._store.shared

    def _capture(self) -> ReplicaState:
        return ReplicaState.capture(
            self.lightning_module,
            self.optimizers,
            self._step_schedulers(),
            pin_memory=self._store.pin_memory,
            precision=self.precision_plugin.state_dict(),
            shared=self._shared_now(),
        )

    def _switch_to(self, target: int) -> None:
        if self._live_is_replica:
            self._store[self._active] = self._capture()
        state = self._store[target]
        if state is None:  # the replica's first batch: start from the initial state
            initial = self.initial_state
            state = ReplicaState(
                initial.module,
                copy.deepcopy(initial.optimizers),
                copy.deepcopy(initial.lr_schedulers),
                copy.deepcopy(initial.precision),
            )
        self._store[target] = None  # live from now on; the optimizer may alias its tensors
        self._load(state)
        self._active = target
        self._live_is_replica = True

    def _load(self, state: ReplicaState) -> None:
        self.load_module_state(state.module)
        swapped = {id(sched) for sched in self._step_schedulers()}
        shared = [
            c.scheduler
            for c in self.lightning_module.trainer.lr_scheduler_configs
            if id(c.scheduler) not in swapped
        ]
        shared_lrs = {
            id(sched.optimizer): [g["lr"] for g in sched.optimizer.param_groups] for sched in shared
        }
        for opt, opt_state in zip(self.optimizers, state.optimizers):
            if self._sharded:
                device_groups.load_optimizer_state(opt, opt_state)
            else:
                opt.load_state_dict(opt_state)
            # epoch-interval schedules are shared: keep the live learning rates
            for group, lr in zip(opt.param_groups, shared_lrs.get(id(opt), [])):
                group["lr"] = lr
        schedulers = self._step_schedulers()
        if len(schedulers) != len(state.lr_schedulers):
            raise MisconfigurationException(
                f"DataOrderEnsemble: a replica's saved state holds {len(state.lr_schedulers)} "
                f"per-replica LR scheduler state(s) but this fit swaps {len(schedulers)} (every "
                "scheduler under manual optimization, else the step-interval ones); resume with "
                "the schedulers of the checkpoint's fit, or start a new fit without ckpt_path."
            )
        for sched, sched_state in zip(schedulers, state.lr_schedulers):
            sched.load_state_dict(sched_state)
        if state.precision:  # each replica keeps its own loss scale (fp16 mixed precision)
            self.precision_plugin.load_state_dict(state.precision)
