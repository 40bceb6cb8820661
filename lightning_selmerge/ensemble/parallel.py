"""The ensemble's processes, devices and collectives: Lightning's ``DDPStrategy`` plumbing
without the DDP wrapper, on a ``("replica", "shard")`` device mesh.

:class:`ReplicaMeshStrategy` is the base of
:class:`~lightning_selmerge.ensemble.DataOrderEnsemble`: it starts the ranks (Lightning's
launchers, as for DDP), joins the process group (fabric's ``_init_dist_connection``), lays the
ranks out as replica groups x shards (:class:`~lightning_selmerge.ensemble.device_groups.
ReplicaLayout`), broadcasts rank 0's initial weights, shards the module with FSDP2 over a
group's ranks, and offers the collectives and the sharded-state conversions the ensemble needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _set_num_threads_if_needed,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import (
    _MultiProcessingLauncher,
    _SubprocessScriptLauncher,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_selmerge.ensemble import device_groups, process_groups
from lightning_selmerge.ensemble.device_groups import ReplicaLayout
from lightning_selmerge.ensemble.replica_store import cpu_state_copy

__all__ = ["ReplicaMeshStrategy", "StartMethod"]

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


class ReplicaMeshStrategy(ParallelStrategy):
    """A ``ParallelStrategy`` whose ``devices x num_nodes`` ranks form replica groups of
    ``shard_size`` ranks each (a ``("replica", "shard")`` device mesh); no gradient sync.

    On one device there is no process group and the layout holds all K replicas.

    Example:
        >>> strategy = ReplicaMeshStrategy(num_replicas=4)
        >>> strategy.is_distributed, strategy.layout.local_replicas, strategy.device_mesh
        (False, [0, 1, 2, 3], None)
    """

    def __init__(
        self,
        num_replicas: int,
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
        self.shard_size = int(shard_size)
        self.shard_modules = None if shard_modules is None else list(shard_modules)
        self._start_method = start_method
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._num_nodes = 1
        self._layout = ReplicaLayout(self.num_replicas, 1, 1, 0)
        self._mesh: Any = None
        self._sharded = False
        self._offsets: dict[str, int] = {}  # flat offset of each local slice (the merge's)

    # -- processes and devices (as Lightning's DDPStrategy) -------------------------------
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

    @property
    def sharded(self) -> bool:
        """Whether the module is sharded with FSDP2 over a group's ranks (``shard_size > 1``,
        once the fit set the model up): every state the strategy holds is then local slices."""
        return self._sharded

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

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
            self.num_replicas, world, self.shard_size, self.global_rank, self.root_device.type
        )
        if not self.is_distributed:
            return
        # Lightning's launcher sets the CPU thread count on the launching rank only, after
        # starting the others: give every rank the same (a thread count changes float sums)
        _set_num_threads_if_needed(num_processes=self.num_processes)
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

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.is_distributed:
            return model
        device_groups.broadcast_weights(model, self._mesh["replica"])
        trainer = self.lightning_module.trainer
        if self.shard_size > 1 and trainer.state.fn == TrainerFn.FITTING:
            device_groups.shard_module(model, self._mesh["shard"], self.shard_modules)
            self._sharded = True
            self._offsets = device_groups.local_offsets(model.state_dict())
        return model

    # -- collectives ----------------------------------------------------------------------
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

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``all_reduce(SUM)`` over every rank (identity on one device)."""
        if not self.is_distributed:
            return tensor
        reduced = tensor.to(self.root_device)
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    # -- module states (local slices when sharded) ----------------------------------------
    def module_state(self) -> dict[str, torch.Tensor]:
        """CPU copy of the live module's state (this rank's slices when sharded)."""
        return cpu_state_copy(self.lightning_module.state_dict())

    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a state from :meth:`module_state` (or a merge of such states) into the module."""
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

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._sharded:  # whole tensors on the rank that writes the checkpoint
            return self.full_state(self.module_state(), rank=0)
        return super().lightning_module_state_dict()
