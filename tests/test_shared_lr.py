"""A step-interval (per-replica) and an epoch-interval (shared) LR schedule on one optimizer:
each replica's learning rate is its own schedule's times the shared one's, and a resume keeps it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from ensemble_support import Net, fit
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")

K, EPOCHS, LR, GAMMA = 3, 3, 1e-2, 0.5


class WarmupAndDecay(Net):
    """A warmup per replica (4 steps, from 0.1 x LR) and a decay per epoch (x 0.5)."""

    def configure_optimizers(self) -> dict:
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
        decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=GAMMA)
        return [opt], [
            {"scheduler": warmup, "interval": "step"},
            {"scheduler": decay, "interval": "epoch"},
        ]


class LearningRates(Callback):
    """(epoch, replica, learning rate) at every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        replica = trainer.strategy.active_replica
        self.seen.append((trainer.current_epoch, replica, optimizer.param_groups[0]["lr"]))


def run(tmp: Path | None = None, ckpt_path: str | None = None):
    rates = LearningRates()
    callbacks = [SelectionMergeCallback(seed=1), rates]
    kwargs = {}
    if tmp is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=5, save_top_k=-1))
        kwargs["enable_checkpointing"] = True
    module = WarmupAndDecay()
    strategy = DataOrderEnsemble(num_replicas=K, seed=3)
    trainer, _ = fit(
        module, K, EPOCHS, callbacks, strategy=strategy, ckpt_path=ckpt_path,
        limit_train_batches=4, **kwargs,
    )  # fmt: skip
    return module, trainer, rates.seen


def test_each_replica_warms_up_on_its_own_and_decays_with_the_epochs() -> None:
    _, _, seen = run()
    steps = {k: 0 for k in range(K)}
    for epoch, replica, lr in seen:
        warmup = 0.1 + 0.9 * min(steps[replica], 4) / 4  # LinearLR's factor at this step
        assert lr == pytest.approx(LR * warmup * GAMMA**epoch, rel=1e-9), (epoch, replica)
        steps[replica] += 1
    assert steps == {k: EPOCHS * 4 for k in range(K)}


@pytest.mark.parametrize("step", [15, 25])  # epoch 1, inside replica 0 / epoch 2, replica 0
def test_a_resume_keeps_each_replicas_learning_rate(tmp_path: Path, step: int) -> None:
    final, _, seen = run(tmp_path)
    (ckpt,) = tmp_path.glob(f"*-step={step}.ckpt")
    resumed, trainer, after = run(ckpt_path=str(ckpt))
    assert trainer.global_step == EPOCHS * K * 4
    assert after == seen[step:]
    for name, tensor in final.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


class Backbone(Net):
    """``BackboneFinetuning``'s layout: a frozen ``backbone`` unfrozen at an epoch's start (a new
    optimizer group), the head training from the start."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(self.net[0], self.net[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        head = [p for p in self.net[3].parameters()]
        return torch.optim.SGD(head, lr=LR)


class WarmedBackbone(Backbone):
    """The same, with a per-replica warmup (a step-interval scheduler) on the optimizer."""

    def configure_optimizers(self) -> dict:
        opt = super().configure_optimizers()
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


@pytest.mark.parametrize("module_class", [Backbone, WarmedBackbone])
def test_backbone_finetuning_unfreezes_every_replica_alike(module_class: type) -> None:
    """Its new group reaches every replica as added, and its learning rate, raised at each
    later epoch's start on the live optimizer, reaches every replica (a per-replica warmup on
    the same optimizer or not)."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    rates, module = GroupRates(), module_class()
    initial = {n: t.clone() for n, t in module.backbone.state_dict().items()}
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda e: 1.5)
    _, strategy = fit(
        module, K, EPOCHS, [SelectionMergeCallback(seed=1), unfreeze, rates],
        limit_train_batches=4,
    )  # fmt: skip
    by_epoch: dict[int, set[tuple[float, ...]]] = {}
    for epoch, _, lrs in rates.seen:
        if epoch > 0 or module_class is Backbone:  # (epoch 0: each replica warms up the head)
            by_epoch.setdefault(epoch, set()).add(lrs)
    by_epoch.setdefault(0, {(LR,)})
    assert [len(by_epoch[e]) for e in range(EPOCHS)] == [1] * EPOCHS  # every replica alike
    (first,), (second,), (third,) = (by_epoch[e] for e in range(EPOCHS))
    assert len(first) == 1 and len(second) == len(third) == 2  # the backbone's group from epoch 1
    assert third[1] > second[1]  # raised again at epoch 2's start
    for replica in strategy.replica_states():  # each replica trained its backbone
        assert not torch.equal(replica["net.0.weight"], initial["0.weight"])


class GroupRates(Callback):
    """(epoch, replica, every group's learning rate) at every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, tuple[float, ...]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        lrs = tuple(group["lr"] for group in optimizer.param_groups)
        self.seen.append((trainer.current_epoch, trainer.strategy.active_replica, lrs))


def test_a_step_scheduler_that_did_not_step_is_not_taken_for_a_shared_change() -> None:
    """Two step schedulers on one optimizer, the last with ``frequency: 2``: after a step where
    only the first stepped, the live rate is its rate, not a shared change (the last one's stale
    rate was taken as the baseline, so the warmup's step looked shared)."""
    from lightning_selmerge.ensemble.shared_lr import SharedFactors

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
    every_other = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda step: 0.9)
    factors = SharedFactors()
    mixed = {0: (opt, [warmup, every_other])}
    factors.observe(mixed)
    for step in range(4):
        warmup.step()
        if step % 2:
            every_other.step()
        factors.observe(mixed)
        assert factors.now == {0: [1.0]}, step
    opt.param_groups[0]["lr"] *= 0.5  # a shared change (an epoch schedule, a callback)
    factors.observe(mixed)
    assert factors.now == {0: [0.5]}
