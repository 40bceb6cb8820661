"""ReplicaSwap on its own: a host with a module, an optimizer and LR schedulers, no Trainer."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import LRSchedulerConfig

from lightning_selmerge.ensemble.replica_store import ReplicaStore
from lightning_selmerge.ensemble.replica_swap import ReplicaSwap


class Host:
    """What DataOrderEnsemble offers the swap: the live module, its optimizer and schedulers."""

    def __init__(self, freeze: bool = False) -> None:
        torch.manual_seed(0)
        self.lightning_module = LightningModule()
        self.lightning_module.body = torch.nn.Linear(3, 3)
        self.lightning_module.head = torch.nn.Linear(3, 1)
        if freeze:
            self.lightning_module.body.requires_grad_(False)
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        self.optimizers = [torch.optim.Adam(params, lr=0.1)]
        step = torch.optim.lr_scheduler.StepLR(self.optimizers[0], step_size=1, gamma=0.5)
        self.lr_scheduler_configs = [LRSchedulerConfig(step, interval="step")]
        self.precision_plugin = Precision()
        self.sharded = False

    def load_module_state(self, state):
        self.lightning_module.load_state_dict(state)

    def train_step_without_schedulers(self) -> None:
        loss = self.lightning_module.head(self.lightning_module.body(torch.ones(2, 3))).sum()
        loss.backward()
        self.optimizers[0].step()
        self.optimizers[0].zero_grad()

    def train_step(self) -> None:
        self.train_step_without_schedulers()
        self.lr_scheduler_configs[0].scheduler.step()


def weights(host: Host) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in host.lightning_module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_switching_carries_weights_optimizer_and_step_scheduler():
    host = Host()
    swap = ReplicaSwap(host, ReplicaStore(3))
    swap.start(first=0)
    initial = weights(host)
    host.train_step()
    trained = weights(host)
    adam = {k: v.clone() for k, v in host.optimizers[0].state_dict()["state"][0].items()}

    swap.make_live(1)  # replica 1's first batch: the initial state, fresh optimizer and schedule
    assert swap.active == 1 and swap.store[1] is None
    assert_same(weights(host), initial)
    assert host.optimizers[0].state_dict()["state"] == {}
    assert host.optimizers[0].param_groups[0]["lr"] == 0.1
    host.train_step()
    host.train_step()

    swap.make_live(0)  # back to replica 0, as it was stored
    assert_same(weights(host), trained)
    assert_same(host.optimizers[0].state_dict()["state"][0], adam)
    assert host.optimizers[0].param_groups[0]["lr"] == 0.05
    assert host.lr_scheduler_configs[0].scheduler.last_epoch == 1
    assert swap.store[1] is not None and swap.store[0] is None


def test_make_live_of_the_live_replica_changes_nothing():
    host = Host()
    swap = ReplicaSwap(host, ReplicaStore(2))
    swap.start(first=0)
    host.train_step()
    before = weights(host)
    swap.make_live(0)
    assert_same(weights(host), before)
    assert swap.store[0] is None  # not stored: still live


def test_epoch_interval_schedule_is_shared_not_swapped():
    host = Host()
    epoch = torch.optim.lr_scheduler.StepLR(host.optimizers[0], step_size=1, gamma=0.1)
    host.lr_scheduler_configs = [LRSchedulerConfig(epoch, interval="epoch")]
    swap = ReplicaSwap(host, ReplicaStore(2))
    swap.start(first=0)
    assert swap.step_schedulers() == []
    host.train_step_without_schedulers()
    epoch.step()  # the epoch schedule moves; every replica follows it
    live_lr = host.optimizers[0].param_groups[0]["lr"]
    assert live_lr < 0.1
    swap.make_live(1)  # replica 1's optimizer state holds lr 0.1: the live rate is kept
    assert host.optimizers[0].param_groups[0]["lr"] == live_lr


def test_manual_optimization_swaps_every_scheduler():
    host = Host()
    epoch = torch.optim.lr_scheduler.StepLR(host.optimizers[0], step_size=1, gamma=0.1)
    host.lr_scheduler_configs = [LRSchedulerConfig(epoch, interval="epoch")]
    host.lightning_module.automatic_optimization = False
    swap = ReplicaSwap(host, ReplicaStore(2))
    assert swap.step_schedulers() == [epoch]


def test_frozen_parameters_are_held_once_until_unfrozen():
    host = Host(freeze=True)
    swap = ReplicaSwap(host, ReplicaStore(2))
    swap.start(first=0)
    assert set(swap.shared_now()) == {"body.weight", "body.bias"}
    host.train_step()
    swap.make_live(1)
    stored = swap.store[0]
    assert stored.module["body.weight"] is swap.initial_state.module["body.weight"]
    host.lightning_module.body.requires_grad_(True)  # e.g. BaseFinetuning unfreezes it
    assert swap.shared_now() == {}
    assert swap.frozen_names() == set()


def test_release_live_then_reset_sets_every_replica_and_keeps_optimizers():
    host = Host()
    swap = ReplicaSwap(host, ReplicaStore(2))
    swap.start(first=0)
    host.train_step()
    swap.release_live()
    assert not swap.live_is_replica and swap.store[0] is not None
    adam = swap.store[0].optimizers
    merged = {k: torch.full_like(v, 3.0) for k, v in weights(host).items()}
    swap.reset(merged, replicas=[0, 1])
    assert_same(swap.store[0].module, merged)
    assert_same(swap.store[1].module, merged)
    assert swap.store[0].optimizers is adam
    swap.make_live(0)  # the module held other weights: replica 0 is loaded even though active
    assert swap.live_is_replica
    assert_same(weights(host), merged)


def test_state_dict_round_trip_restores_the_replicas():
    host = Host()
    swap = ReplicaSwap(host, ReplicaStore(2))
    swap.start(first=0)
    host.train_step()
    swap.make_live(1)
    host.train_step()
    saved = swap.state_dict(live_as_module=False)
    live = weights(host)

    other = Host()
    restored = ReplicaSwap(other, ReplicaStore(2))
    restored.restore(saved, load_live=True)
    assert restored.active == 1 and restored.live_is_replica
    assert_same(weights(other), live)
    assert_same(restored.state_of(0).module, swap.state_of(0).module)
    assert_same(restored.initial_state.module, swap.initial_state.module)


def test_a_state_with_other_schedulers_is_refused():
    host = Host()
    swap = ReplicaSwap(host, ReplicaStore(2))
    swap.start(first=0)
    state = swap.capture()
    state.lr_schedulers = []
    with pytest.raises(MisconfigurationException, match="holds 0 per-replica LR scheduler"):
        swap.load(state)


def test_initial_state_before_start_is_an_error():
    swap = ReplicaSwap(Host(), ReplicaStore(2))
    with pytest.raises(RuntimeError, match="no initial state before training starts"):
        _ = swap.initial_state
    swap.release_live()  # nothing live yet: nothing to store
    assert swap.store[0] is None


def test_the_strategy_and_its_swap_pickle_for_spawned_ranks():
    import pickle

    from lightning_selmerge.ensemble import DataOrderEnsemble

    strategy = pickle.loads(pickle.dumps(DataOrderEnsemble(num_replicas=3, seed=5)))
    assert strategy.num_replicas == 3 and strategy.seed == 5
    assert strategy._swap.host is strategy
