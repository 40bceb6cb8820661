"""Swapping replicas through one live module: which replica the module holds, and the moves
between it and the :class:`~lightning_selmerge.ensemble.ReplicaStore`.

A replica's state is its module tensors, its optimizers' states, the states of the LR
schedulers swapped with it (step-interval ones; every one under manual optimization) and the
precision plugin's (a loss scaler's). Frozen parameters are held once for all replicas (the
initial state's tensors) as long as they stay frozen.

Example:
    >>> import torch
    >>> from lightning.pytorch import LightningModule
    >>> from lightning.pytorch.plugins.precision import Precision
    >>> class Host:  # what DataOrderEnsemble offers
    ...     lightning_module = LightningModule()
    ...     lightning_module.layer = torch.nn.Linear(2, 1)
    ...     optimizers = [torch.optim.SGD(lightning_module.parameters(), lr=0.1)]
    ...     lr_scheduler_configs, precision_plugin, sharded = [], Precision(), False
    ...     def load_module_state(self, state):
    ...         self.lightning_module.load_state_dict(state)
    >>> swap = ReplicaSwap(Host(), ReplicaStore(num_replicas=2))
    >>> swap.start(first=0)
    >>> with torch.no_grad():
    ...     _ = Host.lightning_module.layer.bias.fill_(7.0)
    >>> swap.make_live(1)  # replica 0 is stored, replica 1 starts from the initial state
    >>> swap.active, swap.store[0].module["layer.bias"].item() == 7.0
    (1, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_selmerge.ensemble import device_groups
from lightning_selmerge.ensemble.added_groups import AddedGroups
from lightning_selmerge.ensemble.replica_store import ReplicaState, ReplicaStore, cpu_state_copy
from lightning_selmerge.ensemble.shared_lr import SharedFactors, mixed_optimizers

__all__ = ["ReplicaSwap", "SwapHost"]


class SwapHost(Protocol):
    """What the swap reads from the strategy that owns it."""

    @property
    def lightning_module(self) -> LightningModule: ...
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]: ...
    @property
    def lr_scheduler_configs(self) -> list[Any]: ...
    @property
    def precision_plugin(self) -> Precision: ...
    @property
    def sharded(self) -> bool: ...
    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None: ...


class ReplicaSwap:
    """The replicas one rank trains, one at a time in the host's live module.

    ``active`` is the replica the module holds; ``live_is_replica`` is ``False`` while the
    module holds other weights (after :meth:`release_live`, e.g. the merged ones); ``initial``
    is the state every replica started from (``None`` before the fit's first batch).
    ``load``: what switching and restoring call to load a replica's state (default
    :meth:`load`; the strategy routes it through its own method).
    """

    def __init__(
        self,
        host: SwapHost,
        store: ReplicaStore,
        load: Callable[[ReplicaState], None] | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self._load = self.load if load is None else load  # how a state enters the live module
        self.active = 0
        self.live_is_replica = True
        self.initial: ReplicaState | None = None
        self.shared_lr = SharedFactors()  # shared rate changes, where step schedulers act too
        self.added_groups = AddedGroups()  # optimizer groups added during the fit
        self._restoring = False

    @property
    def initial_state(self) -> ReplicaState:
        """:attr:`initial`, which must be set (training started)."""
        if self.initial is None:
            raise RuntimeError("DataOrderEnsemble: no initial state before training starts.")
        return self.initial

    # -- the fit's start ------------------------------------------------------------------
    def start(self, first: int) -> None:
        """A new fit: the live module, as it is, is every replica's start; ``first`` is live."""
        self.store.clear()
        self.store.share({})
        self.shared_lr = SharedFactors()
        self.added_groups = AddedGroups()
        self.active = first
        self.live_is_replica = True
        self.initial = self.capture()
        self.share_frozen()

    def restore(self, saved: Mapping[str, Any], load_live: bool) -> None:
        """A resumed fit: the replicas of :meth:`state_dict`'s ``saved``; with ``load_live``
        the live replica's state is loaded into the module here (else Lightning loaded it)."""
        self.store.clear()
        self.initial = ReplicaState.from_dict(saved["initial"])
        self.share_frozen()
        for replica, state in enumerate(saved["replicas"]):
            self.store[replica] = None if state is None else ReplicaState.from_dict(state)
        self.active = int(saved["active"])
        self.live_is_replica = saved["live"] is not None
        self.shared_lr.load_state_dict(saved.get("shared_lr"))  # absent before it was recorded
        self.added_groups.load_state_dict(saved.get("added_groups"))
        if load_live and self.live_is_replica:
            self._restoring = True  # the saved learning rates, not the fresh optimizer's
            try:
                self._load(ReplicaState.from_dict(saved["live"]))
            finally:
                self._restoring = False

    def state_dict(self, live_as_module: bool) -> dict[str, Any]:
        """``active``, ``live`` (``None`` when the module holds no replica), ``replicas`` and
        ``initial``. With ``live_as_module`` the live entry is the module's state dict only (one
        device: optimizer states are in Lightning's checkpoint), else a whole replica state."""
        live: Any = None
        if self.live_is_replica:  # frozen tensors: the shared ones, which torch.save stores once
            shared = self.shared_now()
            live = (
                cpu_state_copy(self.host.lightning_module.state_dict(), shared=shared)
                if live_as_module
                else self.capture().to_dict()
            )
        return {
            "active": self.active,
            "live": live,
            "replicas": [
                None if (state := self.store[k]) is None else state.to_dict()
                for k in range(self.store.num_replicas)
            ],
            "initial": self.initial_state.to_dict(),
            "shared_lr": self.shared_lr.state_dict(),
            "added_groups": self.added_groups.state_dict(),
        }

    # -- frozen parameters ----------------------------------------------------------------
    def frozen_names(self) -> set[str]:
        """State-dict names of the module's parameters that do not train now."""
        params = self.host.lightning_module.named_parameters(remove_duplicate=False)
        return {name for name, param in params if not param.requires_grad}

    def share_frozen(self) -> None:
        """Hold the frozen parameters once for all replicas: the initial state's tensors."""
        initial = self.initial_state.module
        self.store.share({n: initial[n] for n in self.frozen_names() if n in initial})

    def shared_now(self) -> dict[str, torch.Tensor]:
        """The shared tensors of parameters still frozen; one unfrozen since (e.g. by
        ``BaseFinetuning``) is no longer shared: each replica trains its own from here on."""
        shared = self.store.shared
        if shared:
            self.store.unshare(set(shared) - self.frozen_names())
        return self.store.shared

    # -- moves ----------------------------------------------------------------------------
    def step_schedulers(self) -> list[Any]:
        """The LR schedulers swapped with their replica: step-interval ones, and every one under
        manual optimization (Lightning steps none there; the user steps them in the batches)."""
        manual = not self.host.lightning_module.automatic_optimization
        configs = self.host.lr_scheduler_configs
        return [cfg.scheduler for cfg in configs if manual or cfg.interval == "step"]

    def mixed_optimizers(self) -> dict[int, tuple[torch.optim.Optimizer, list[Any]]]:
        """Under automatic optimization, the optimizers a swapped (step-interval) scheduler sets,
        whose learning rate may also change between steps for every replica (an epoch-interval
        schedule, a callback at an epoch's start): :mod:`.shared_lr`."""
        if not self.host.lightning_module.automatic_optimization:
            return {}
        return mixed_optimizers(self.host.optimizers, self.step_schedulers())

    def store_live(self) -> None:
        """Store the live replica, with what shared changes made to its learning rates."""
        self.shared_lr.observe(self.mixed_optimizers())
        self.store[self.active] = self.capture()
        self.shared_lr.stored(self.active)

    def capture(self) -> ReplicaState:
        """CPU copies of the live replica's state (frozen parameters: the shared tensors)."""
        return ReplicaState.capture(
            self.host.lightning_module,
            self.host.optimizers,
            self.step_schedulers(),
            pin_memory=self.store.pin_memory,
            precision=self.host.precision_plugin.state_dict(),
            shared=self.shared_now(),
        )

    def state_of(self, replica: int) -> ReplicaState:
        """Replica ``replica``'s state: captured when live, else stored, else the initial."""
        if self.live_is_replica and replica == self.active:
            return self.capture()
        return self.store[replica] or self.initial_state

    def make_live(self, target: int) -> None:
        """Have the module hold replica ``target`` (nothing to do when it already does)."""
        if target != self.active or not self.live_is_replica:
            self.switch_to(target)

    def switch_to(self, target: int) -> None:
        """Store the live replica (if the module holds one) and load replica ``target``."""
        if self.live_is_replica:
            self.store_live()
        else:  # the module holds the merge; the optimizer went on holding the last replica's
            self.shared_lr.observe(self.mixed_optimizers())  # learning rates
        state = self.store[target]
        if state is None:  # the replica's first batch: start from the initial state
            initial = self.initial_state
            state = ReplicaState(
                initial.module,
                copy.deepcopy(initial.optimizers),
                copy.deepcopy(initial.lr_schedulers),
                copy.deepcopy(initial.precision),
            )
        self.store[target] = None  # live from now on; the optimizer may alias its tensors
        self._load(state)
        self.shared_lr.apply(self.mixed_optimizers(), target)
        self.active = target
        self.live_is_replica = True

    def load(self, state: ReplicaState) -> None:
        """Load ``state`` into the module, optimizers, swapped schedulers and precision plugin.

        Under automatic optimization an optimizer that no step-interval scheduler sets keeps its
        live learning rates: only what all replicas share changes them (epoch-interval
        schedules, callbacks at an epoch's start such as ``BackboneFinetuning``). Where a
        step-interval scheduler acts too, :meth:`switch_to` scales the replica's own
        (:mod:`.shared_lr`). A resumed replica (:meth:`restore`) gets its saved ones.
        """
        host = self.host
        host.load_module_state(state.module)
        own = {id(sched.optimizer) for sched in self.step_schedulers()}
        shared_lrs = {
            id(opt): [g["lr"] for g in opt.param_groups]
            for opt in host.optimizers
            if host.lightning_module.automatic_optimization
            and id(opt) not in own
            and not self._restoring
        }
        for index, (opt, opt_state) in enumerate(zip(host.optimizers, state.optimizers)):
            # a state from before a group was added (BackboneFinetuning) gets it
            opt_state = self.added_groups.complete(index, opt, opt_state)
            if host.sharded:
                device_groups.load_optimizer_state(opt, opt_state)
            else:
                opt.load_state_dict(opt_state)
            for group, lr in zip(opt.param_groups, shared_lrs.get(id(opt), [])):
                group["lr"] = lr
        schedulers = self.step_schedulers()
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
            host.precision_plugin.load_state_dict(state.precision)

    # -- the module holding other weights -------------------------------------------------
    def release_live(self) -> None:
        """Store the live replica so the module may hold other weights (e.g. the merged ones)."""
        if self.live_is_replica and self.initial is not None:
            self.store_live()
            self.live_is_replica = False

    def reset(self, module_state: Mapping[str, torch.Tensor], replicas: Sequence[int]) -> None:
        """Set the weights of ``replicas`` to ``module_state``; optimizer states are kept."""
        for replica in replicas:
            if self.live_is_replica and replica == self.active:
                self.host.load_module_state(module_state)
                continue
            old = self.store[replica] or self.initial_state
            self.store[replica] = ReplicaState(
                dict(module_state), old.optimizers, old.lr_schedulers, old.precision
            )
