"""``DataOrderEnsemble``: train K replicas one after another inside each Lightning epoch."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset

from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler
from lightning_selmerge.merging.state_dict import storage_key

__all__ = ["DataOrderEnsemble", "ReplicaState", "cpu_state_copy"]


def cpu_state_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict; tensors sharing storage (tied weights) stay tied."""
    memo: dict[tuple, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = storage_key(tensor)
        if key not in memo:
            memo[key] = tensor.detach().to("cpu", copy=True)
        out[name] = memo[key]
    return out


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class ReplicaState:
    """One replica's stored training state (CPU copies)."""

    module: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    lr_schedulers: list[dict[str, Any]] = field(default_factory=list)


class DataOrderEnsemble(SingleDeviceStrategy):
    """Train ``num_replicas`` copies of the module, each on its own data order, in one fit.

    In every epoch the train loader yields replica 0's order (``DataOrderSampler.order(epoch,
    0)``) in batches, then replica 1's, and so on; at each replica boundary the strategy stores
    the finished replica's parameters, buffers, optimizer and LR-scheduler states (CPU copies)
    and loads the next one's. All replicas start from the module's weights at fit start. The
    train loader's own sampler is replaced (its dataset, batch size, ``drop_last``, collate
    function and workers are kept); an ``int`` ``limit_train_batches`` applies per replica.
    Pair it with :class:`~lightning_selmerge.ensemble.SelectionMergeCallback` to merge.

    Refused: ``num_replicas < 2``, ``val_check_interval != 1.0``, a float
    ``limit_train_batches`` other than 1.0, ``overfit_batches``, iterable datasets, and an
    ``accumulate_grad_batches`` that does not divide the batches per replica. Epoch-interval LR
    schedulers are shared (every replica sees the same epoch schedule); step-interval ones are
    per replica.

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
        device: _DEVICE = "cpu",
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        if int(num_replicas) < 2:
            raise ValueError(
                f"DataOrderEnsemble: num_replicas={num_replicas} trains a single model; use "
                "num_replicas >= 2 (or a plain strategy for one model)."
            )
        super().__init__(
            device=device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.num_replicas = int(num_replicas)
        self.seed = int(seed)
        self.fixed_batches = fixed_batches
        self.batch_sampler: EnsembleBatchSampler | None = None
        self._active = 0
        self._live_is_replica = True
        self._stored: list[ReplicaState | None] = [None] * self.num_replicas
        self._initial: ReplicaState | None = None
        self._per_replica_limit: int | None = None
        self._saved_limit: int | float | None = None

    # -- public view ----------------------------------------------------------------------
    @property
    def active_replica(self) -> int:
        """The replica whose weights the live module holds (during training)."""
        return self._active

    @property
    def batches_per_replica(self) -> int:
        """Training batches of each replica per epoch (known once the train loader is set)."""
        if self.batch_sampler is None:
            raise RuntimeError("DataOrderEnsemble: the train dataloader is not set up yet.")
        return self.batch_sampler.batches_per_replica

    def replica_of(self, batch_idx: int) -> int:
        """The replica that training batch ``batch_idx`` of an epoch belongs to."""
        return batch_idx // self.batches_per_replica

    def replica_state(self, replica: int) -> ReplicaState:
        """Replica ``replica``'s full state (module, optimizers, schedulers), as CPU copies."""
        if self._live_is_replica and replica == self._active:
            return self._capture()
        stored = self._stored[replica]
        if stored is None:
            if self._initial is None:
                raise RuntimeError("DataOrderEnsemble: no replica state before training starts.")
            return self._initial
        return stored

    def replica_states(self) -> list[dict[str, torch.Tensor]]:
        """The K replicas' module state dicts (the active one copied from the live module)."""
        return [self.replica_state(k).module for k in range(self.num_replicas)]

    def release_live(self) -> None:
        """Store the live replica so the module may hold other weights (e.g. the merged ones)."""
        if self._live_is_replica and self._initial is not None:
            self._stored[self._active] = self._capture()
            self._live_is_replica = False

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_trainer(trainer)
        limit = trainer.limit_train_batches
        if isinstance(limit, int) and limit > 0:
            self._saved_limit, self._per_replica_limit = limit, limit
            trainer.limit_train_batches = 1.0  # the ensemble sampler applies it per replica

    def teardown(self) -> None:
        module = self._lightning_module
        if self._saved_limit is not None and module is not None and module._trainer is not None:
            module.trainer.limit_train_batches = self._saved_limit
        self._saved_limit = None
        super().teardown()

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader) or isinstance(
            dataloader.dataset, IterableDataset
        ):
            raise MisconfigurationException(
                "DataOrderEnsemble needs a map-style torch DataLoader with a batch_size as the "
                f"train dataloader (got {type(dataloader).__name__}); it replaces its sampler."
            )
        batch_size = dataloader.batch_size
        if batch_size is None:
            batch_size = getattr(dataloader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise MisconfigurationException(
                "DataOrderEnsemble: the train DataLoader has no batch_size; give it one, "
                "e.g. DataLoader(dataset, batch_size=32)."
            )
        drop_last = bool(getattr(dataloader.batch_sampler, "drop_last", dataloader.drop_last))
        orders = DataOrderSampler(
            dataloader.dataset,
            seed=self.seed,
            fixed_batches=self.fixed_batches,
            batch_size=batch_size if self.fixed_batches else None,
        )
        sampler = EnsembleBatchSampler(
            orders, self.num_replicas, batch_size, drop_last, self._per_replica_limit
        )
        if sampler.batches_per_replica == 0:
            raise MisconfigurationException(
                "DataOrderEnsemble: each replica gets 0 training batches; use a smaller "
                "batch_size or drop_last=False."
            )
        accumulate = trainer.accumulate_grad_batches
        if sampler.batches_per_replica % accumulate:
            raise MisconfigurationException(
                f"DataOrderEnsemble: accumulate_grad_batches={accumulate} does not divide the "
                f"{sampler.batches_per_replica} batches of each replica, so one optimizer step "
                "would mix two replicas; choose a divisor of it (or change batch_size / "
                "limit_train_batches)."
            )
        self.batch_sampler = sampler
        return DataLoader(
            dataloader.dataset,
            batch_sampler=sampler,
            num_workers=dataloader.num_workers,
            collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory,
            timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context,
            generator=dataloader.generator,
            persistent_workers=dataloader.persistent_workers,
        )

    def on_train_start(self) -> None:
        super().on_train_start()
        self._stored = [None] * self.num_replicas
        self._active = 0
        self._live_is_replica = True
        self._initial = self._capture()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        target = self.replica_of(batch_idx)
        if target != self._active or not self._live_is_replica:
            self._switch_to(target)

    # -- internals ------------------------------------------------------------------------
    def _check_trainer(self, trainer: Any) -> None:
        interval = trainer.val_check_interval
        if not (isinstance(interval, float) and interval == 1.0):
            raise MisconfigurationException(
                f"DataOrderEnsemble: val_check_interval={interval!r} would validate in the "
                "middle of the replicas' pass; use val_check_interval=1.0 (the default) and "
                "check_val_every_n_epoch to validate less often."
            )
        limit = trainer.limit_train_batches
        if isinstance(limit, float) and limit not in (0.0, 1.0):
            raise MisconfigurationException(
                f"DataOrderEnsemble: limit_train_batches={limit} (a fraction) would cut the "
                "later replicas out of the epoch; give an int, which DataOrderEnsemble applies "
                "per replica (limit_train_batches=10 trains each replica on 10 batches)."
            )
        if trainer.overfit_batches > 0:
            raise MisconfigurationException(
                "DataOrderEnsemble: overfit_batches is not supported; use limit_train_batches "
                "(per replica) instead."
            )

    def _capture(self) -> ReplicaState:
        trainer = self.lightning_module.trainer
        return ReplicaState(
            module=cpu_state_copy(self.lightning_module.state_dict()),
            optimizers=[_to_cpu(opt.state_dict()) for opt in self.optimizers],
            lr_schedulers=[
                _to_cpu(cfg.scheduler.state_dict())
                for cfg in trainer.lr_scheduler_configs
                if cfg.interval == "step"
            ],
        )

    def _switch_to(self, target: int) -> None:
        if self._live_is_replica:
            self._stored[self._active] = self._capture()
        state = self._stored[target] or self._initial
        assert state is not None
        self._load(state)
        self._active = target
        self._live_is_replica = True

    def _load(self, state: ReplicaState) -> None:
        trainer = self.lightning_module.trainer
        self.lightning_module.load_state_dict(state.module)
        epoch_sched = [c for c in trainer.lr_scheduler_configs if c.interval != "step"]
        shared_lrs = {
            id(c.scheduler.optimizer): [g["lr"] for g in c.scheduler.optimizer.param_groups]
            for c in epoch_sched
        }
        for opt, opt_state in zip(self.optimizers, state.optimizers):
            opt.load_state_dict(copy.deepcopy(opt_state))
            # epoch-interval schedules are shared: keep the live learning rates
            for group, lr in zip(opt.param_groups, shared_lrs.get(id(opt), [])):
                group["lr"] = lr
        step_sched = [c for c in trainer.lr_scheduler_configs if c.interval == "step"]
        for cfg, sched_state in zip(step_sched, state.lr_schedulers):
            cfg.scheduler.load_state_dict(copy.deepcopy(sched_state))
