"""``DataOrderEnsemble``: train K replicas one after another inside each Lightning epoch."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _DEVICE, _PATH
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset

from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.ensemble.replica_store import (
    Offload,
    ReplicaState,
    ReplicaStore,
    cpu_state_copy,
)
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler

__all__ = ["CHECKPOINT_KEY", "DataOrderEnsemble", "ReplicaState", "cpu_state_copy"]

#: checkpoint key of the ensemble's own state (replicas, initial weights, RNG, active replica)
CHECKPOINT_KEY = "data_order_ensemble"


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class _ResumableLoader(DataLoader):
    """The ensemble's train loader; Lightning saves and restores its position in the epoch."""

    progress: Callable[[], tuple[int, int]]  # () -> (epoch, batches done in it)

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.progress()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        assert isinstance(self.batch_sampler, EnsembleBatchSampler)
        self.batch_sampler.resume(int(state["epoch"]), int(state["batches_done"]))


class DataOrderEnsemble(SingleDeviceStrategy):
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

    Checkpoints carry every replica's state, the initial weights, the active replica, the RNG
    states and the position in the epoch (under ``checkpoint["data_order_ensemble"]`` and the
    fit loop's loader state), so ``trainer.fit(..., ckpt_path=...)`` continues exactly, also
    from a checkpoint saved in the middle of an epoch. ``checkpoint["state_dict"]`` is left to
    the merge callback (the merged model); the live replica's weights are stored under this
    strategy's key.

    Refused: ``num_replicas < 2``, ``val_check_interval != 1.0``, a float
    ``limit_train_batches`` other than 1.0, ``overfit_batches``, iterable datasets, and an
    ``accumulate_grad_batches`` that does not divide the batches per replica. Epoch-interval LR
    schedulers are shared (every replica sees the same epoch schedule, and a
    ``ReduceLROnPlateau`` follows the validated, i.e. merged, metric); step-interval ones are
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
        offload: Offload = "cpu",
        pin_memory: bool = False,
        offload_dir: str | None = None,
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
        if offload not in ("cpu", "disk"):
            raise ValueError(
                f"DataOrderEnsemble: offload={offload!r}; use 'cpu' (inactive replicas in CPU "
                "memory) or 'disk' (in safetensors files under offload_dir)."
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
        self.offload = offload
        self.batch_sampler: EnsembleBatchSampler | None = None
        self._store = ReplicaStore(self.num_replicas, offload, pin_memory, offload_dir)
        self._active = 0
        self._live_is_replica = True
        self._initial: ReplicaState | None = None
        self._to_restore: dict[str, Any] | None = None
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

    @property
    def initial_state(self) -> ReplicaState:
        """The state every replica started from (the module at fit start): the merge's base."""
        if self._initial is None:
            raise RuntimeError("DataOrderEnsemble: no initial state before training starts.")
        return self._initial

    def replica_of(self, batch_idx: int) -> int:
        """The replica that training batch ``batch_idx`` of an epoch belongs to."""
        return batch_idx // self.batches_per_replica

    def replica_state(self, replica: int) -> ReplicaState:
        """Replica ``replica``'s full state (module, optimizers, schedulers), as CPU copies."""
        if self._live_is_replica and replica == self._active:
            return self._capture()
        return self._store[replica] or self.initial_state

    def replica_states(self) -> list[dict[str, torch.Tensor]]:
        """The K replicas' module state dicts (the active one copied from the live module)."""
        return [self.replica_state(k).module for k in range(self.num_replicas)]

    def release_live(self) -> None:
        """Store the live replica so the module may hold other weights (e.g. the merged ones)."""
        if self._live_is_replica and self._initial is not None:
            self._store[self._active] = self._capture()
            self._live_is_replica = False

    def reset_replicas(self, module_state: Mapping[str, torch.Tensor]) -> None:
        """Set every replica's weights to ``module_state``; optimizer states are kept."""
        for replica in range(self.num_replicas):
            if self._live_is_replica and replica == self._active:
                self.lightning_module.load_state_dict(module_state)
                continue
            old = self._store[replica] or self.initial_state
            self._store[replica] = ReplicaState(
                dict(module_state), old.optimizers, old.lr_schedulers
            )

    # -- checkpoints ----------------------------------------------------------------------
    def ensemble_state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the ensemble exactly (saved in checkpoints)."""
        return {
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "fixed_batches": self.fixed_batches,
            "active": self._active,
            "live": cpu_state_copy(self.lightning_module.state_dict())
            if self._live_is_replica
            else None,
            "replicas": [
                None if (state := self._store[k]) is None else state.to_dict()
                for k in range(self.num_replicas)
            ],
            "initial": self.initial_state.to_dict(),
            "rng": _rng_states(),
        }

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if "optimizer_states" in checkpoint and self._initial is not None:  # not weights-only
            checkpoint[CHECKPOINT_KEY] = self.ensemble_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and self._fitting():
            self._check_compatible(saved, checkpoint_path)
            self._to_restore = saved
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and saved["live"] is not None and self._fitting():
            # resuming: the module continues as the live replica, not as the merged model
            checkpoint = {**checkpoint, "state_dict": saved["live"]}
        super().load_model_state_dict(checkpoint, strict=strict)

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_trainer(trainer)
        if trainer.fast_dev_run:  # its max_steps would stop inside replica 0: give each replica
            steps_per_replica = -(-int(trainer.fast_dev_run) // trainer.accumulate_grad_batches)
            trainer.fit_loop.epoch_loop.max_steps = steps_per_replica * self.num_replicas
        limit = trainer.limit_train_batches
        if isinstance(limit, int) and limit > 0:
            self._saved_limit, self._per_replica_limit = limit, limit
            trainer.limit_train_batches = 1.0  # the ensemble sampler applies it per replica

    def teardown(self) -> None:
        module = self._lightning_module
        if self._saved_limit is not None and module is not None and module._trainer is not None:
            module.trainer.limit_train_batches = self._saved_limit
        self._saved_limit = None
        self._to_restore = None
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
        loader = _ResumableLoader(
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
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        loader.progress = lambda: (trainer.current_epoch, progress.processed)
        return loader

    def on_train_start(self) -> None:
        super().on_train_start()
        saved, self._to_restore = self._to_restore, None
        if saved is None:
            self._store.clear()
            self._active = 0
            self._live_is_replica = True
            self._initial = self._capture()
            return
        for replica, state in enumerate(saved["replicas"]):
            self._store[replica] = None if state is None else ReplicaState.from_dict(state)
        self._initial = ReplicaState.from_dict(saved["initial"])
        self._active = int(saved["active"])
        self._live_is_replica = saved["live"] is not None
        _set_rng_states(saved["rng"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
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

    def _check_compatible(self, saved: Mapping[str, Any], path: _PATH) -> None:
        for name in ("num_replicas", "seed", "fixed_batches"):
            if saved[name] != getattr(self, name):
                raise MisconfigurationException(
                    f"DataOrderEnsemble: the checkpoint {Path(str(path)).name} was saved with "
                    f"{name}={saved[name]!r} but this strategy has {name}="
                    f"{getattr(self, name)!r}; resume with DataOrderEnsemble({name}="
                    f"{saved[name]!r}, ...) or start a new fit without ckpt_path."
                )

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

    def _step_schedulers(self) -> list[Any]:
        configs = self.lightning_module.trainer.lr_scheduler_configs
        return [cfg.scheduler for cfg in configs if cfg.interval == "step"]

    def _capture(self) -> ReplicaState:
        return ReplicaState.capture(
            self.lightning_module,
            self.optimizers,
            self._step_schedulers(),
            pin_memory=self._store.pin_memory,
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
            )
        self._store[target] = None  # live from now on; the optimizer may alias its tensors
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
            opt.load_state_dict(opt_state)
            # epoch-interval schedules are shared: keep the live learning rates
            for group, lr in zip(opt.param_groups, shared_lrs.get(id(opt), [])):
                group["lr"] = lr
        for sched, sched_state in zip(self._step_schedulers(), state.lr_schedulers):
            sched.load_state_dict(sched_state)
