"""DataOrderEnsemble + SelectionMergeCallback on a tiny regression model (CPU, seconds)."""

from __future__ import annotations

import warnings

import pytest
import torch
from ensemble_support import BATCH, N, Net, ensemble_trainer, fit, flat, make_data
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.ensemble import (
    DataOrderEnsemble,
    EnsembleBatchSampler,
    SelectionMergeCallback,
)
from lightning_selmerge.merging import NonFiniteError, ParameterSelection, merge_state_dicts

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def test_batch_sampler_partial_batches_stay_with_their_replica() -> None:
    orders = DataOrderSampler(num_samples=10, seed=1)
    sampler = EnsembleBatchSampler(orders, num_replicas=3, batch_size=4)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for r in range(3):
        assert flat(batches[3 * r : 3 * r + 3]) == orders.order(0, r).tolist()
    dropped = EnsembleBatchSampler(orders, num_replicas=3, batch_size=4, drop_last=True)
    assert len(dropped) == 6 and [len(b) for b in dropped] == [4] * 6


@pytest.mark.parametrize("k", [2, 3, 4])
def test_each_replica_sees_its_own_order(k: int) -> None:
    module = Net()
    trainer, strategy = fit(module, k, epochs=2)
    assert strategy.batches_per_replica == 8 and trainer.num_training_batches == 8 * k
    orders = DataOrderSampler(num_samples=N, seed=3)
    for epoch in range(2):
        seen = [(b, idx) for e, b, idx in module.seen if e == epoch]
        assert len(seen) == 8 * k
        for r in range(k):
            got = flat(idx for b, idx in seen if b // 8 == r)
            assert got == orders.order(epoch, r).tolist()
    states = strategy.replica_states()
    assert len(states) == k
    for a in range(k):
        for b in range(a + 1, k):
            assert not torch.equal(states[a]["net.0.weight"], states[b]["net.0.weight"])


def test_limit_train_batches_is_per_replica() -> None:
    module = Net()
    trainer, strategy = fit(module, 3, limit_train_batches=2)
    assert strategy.batches_per_replica == 2 and trainer.num_training_batches == 6
    orders = DataOrderSampler(num_samples=N, seed=3)
    for r in range(3):
        got = flat(idx for _, b, idx in module.seen if b // 2 == r)
        assert got == orders.order(0, r).tolist()[: 2 * BATCH]
    assert trainer.limit_train_batches == 2  # restored after fit


@pytest.mark.parametrize("resample", [0, 2])
def test_fit_end_holds_the_exact_merge(resample: int) -> None:
    module = Net()
    base = {n: t.clone() for n, t in module.state_dict().items()}
    merge = SelectionMergeCallback(resample=resample, seed=11)
    _, strategy = fit(module, 3, epochs=2, callbacks=[merge])
    expected = merge_state_dicts(
        strategy.replica_states(),
        base=base,
        method=ParameterSelection(resample=resample),
        seed=11,
    )
    got = module.state_dict()
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # a real selection: elements from more than one replica, and not any single replica
    states = strategy.replica_states()
    w = got["net.0.weight"]
    sources = {r for r in range(3) if (w == states[r]["net.0.weight"]).any()}
    assert len(sources) > 1


class RecordValidation(Callback):
    """Runs after SelectionMergeCallback's swap-in: records what validation used."""

    def __init__(self, merge: SelectionMergeCallback) -> None:
        self.merge = merge
        self.records: list[tuple[dict, dict]] = []

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int, *args
    ) -> None:
        if batch_idx:
            return
        weights = {n: t.clone() for n, t in pl_module.state_dict().items()}
        merged = {n: t.clone() for n, t in self.merge.merged_state.items()}
        self.records.append((weights, merged))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the swap-out the live module is the last replica, not the merge
        last = trainer.strategy.replica_states()[-1]
        assert torch.equal(pl_module.state_dict()["net.0.weight"], last["net.0.weight"])
        self.records[-1] += (float(trainer.callback_metrics["val_loss"]),)


def test_validation_runs_on_the_merged_weights_each_epoch() -> None:
    module = Net()
    merge = SelectionMergeCallback(seed=5)
    record = RecordValidation(merge)
    fit(module, 2, epochs=2, callbacks=[merge, record], val=True)
    assert len(record.records) == 2
    data = make_data()
    for weights, merged, val_loss in record.records:
        for name in merged:
            assert torch.equal(weights[name], merged[name])
        probe = Net()
        probe.load_state_dict(merged)
        with torch.no_grad():  # two val batches of 30, mean of the batch means
            _, x, y = data.tensors
            expected = (
                sum(
                    torch.nn.functional.mse_loss(probe.net(x[s]), y[s])
                    for s in (slice(0, 30), slice(30, 60))
                )
                / 2
            )
        assert val_loss == pytest.approx(float(expected), rel=1e-6)
    first, second = (merged["net.0.weight"] for _, merged, _ in record.records)
    assert not torch.equal(first, second)


def test_replica_loss_is_logged_per_replica() -> None:
    module = Net()
    trainer, _ = fit(module, 2, callbacks=[SelectionMergeCallback()])
    assert {"replica_0/train_loss", "replica_1/train_loss"} <= set(trainer.callback_metrics)
    assert "replica_2/train_loss" not in trainer.callback_metrics
    a = trainer.callback_metrics["replica_0/train_loss"]
    b = trainer.callback_metrics["replica_1/train_loss"]
    assert not torch.equal(a, b)


def test_optimizer_and_scheduler_state_follow_their_replica() -> None:
    module = Net(scheduler=True)
    init = {n: t.clone() for n, t in module.state_dict().items()}
    _, strategy = fit(module, 3)
    replica1 = strategy.replica_state(1)

    # the same model trained alone on replica 1's order, from the same initial weights
    alone = Net(scheduler=True)
    alone.load_state_dict(init)
    conf = alone.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    data = make_data()
    order = DataOrderSampler(num_samples=N, seed=3).order(0, 1)
    for start in range(0, N, BATCH):
        opt.zero_grad()
        alone.loss(data[order[start : start + BATCH]]).backward()
        opt.step()
        sched.step()

    for name, tensor in alone.state_dict().items():
        assert torch.equal(replica1.module[name], tensor), name
    want = opt.state_dict()
    got = replica1.optimizers[0]
    assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"] == 0.05 * 0.5**2
    for key, state in want["state"].items():
        assert torch.equal(got["state"][key]["exp_avg"], state["exp_avg"])
        assert torch.equal(got["state"][key]["exp_avg_sq"], state["exp_avg_sq"])
        assert float(got["state"][key]["step"]) == 8
    assert replica1.lr_schedulers[0]["last_epoch"] == sched.state_dict()["last_epoch"] == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_check_interval": 0.5}, "val_check_interval"),
        ({"limit_train_batches": 0.5}, "limit_train_batches"),
        ({"accumulate_grad_batches": 3}, "accumulate_grad_batches=3"),
        ({"overfit_batches": 2}, "overfit_batches"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        fit(Net(), 2, **kwargs)


def test_bad_construction_is_refused() -> None:
    with pytest.raises(ValueError, match="num_replicas=1"):
        DataOrderEnsemble(num_replicas=1)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[SelectionMergeCallback()],
        max_epochs=1,
    )
    with pytest.raises(MisconfigurationException, match="DataOrderEnsemble"):
        trainer.fit(Net(), DataLoader(make_data(), batch_size=BATCH))


def test_accumulation_dividing_the_replica_is_accepted() -> None:
    module = Net()
    trainer, _ = fit(module, 2, accumulate_grad_batches=4)
    assert trainer.global_step == 4  # 2 replicas x 8 batches / 4


def test_every_replica_over_several_epochs_equals_training_it_alone() -> None:
    """Across epochs and merged-validation swaps, each replica continues its own run exactly."""
    module = Net()
    init = {n: t.clone() for n, t in module.state_dict().items()}
    epochs, k = 3, 3
    _, strategy = fit(module, k, epochs=epochs, callbacks=[SelectionMergeCallback()], val=True)
    data = make_data()
    orders = DataOrderSampler(num_samples=N, seed=3)
    for replica in range(k):
        alone = Net()
        alone.load_state_dict(init)
        opt = alone.configure_optimizers()
        for epoch in range(epochs):
            order = orders.order(epoch, replica)
            for start in range(0, N, BATCH):
                opt.zero_grad()
                alone.loss(data[order[start : start + BATCH]]).backward()
                opt.step()
        stored = strategy.replica_states()[replica]
        for name, tensor in alone.state_dict().items():
            assert torch.equal(stored[name], tensor), (replica, name)
    # and the module holds the merge, not a replica
    assert not torch.equal(module.state_dict()["net.0.weight"], stored["net.0.weight"])


class _PoisonReplica(Callback):
    """Puts a NaN into replica 1's weights at its last batch (a diverged replica)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        strategy = trainer.strategy
        if (
            strategy.replica_of(batch_idx) == 1
            and (batch_idx + 1) % strategy.batches_per_replica == 0
        ):
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


def test_a_diverged_replica_stops_the_merge_naming_it() -> None:
    with pytest.raises(NonFiniteError, match="replica 1") as err:
        fit(Net(), 3, callbacks=[_PoisonReplica(), SelectionMergeCallback()])
    assert err.value.tensor == "net.0.weight" and err.value.replicas == (1,)


def test_a_diverged_replica_can_be_dropped() -> None:
    merge = SelectionMergeCallback(nonfinite="drop")
    with pytest.warns(UserWarning, match="replica 1"):
        _, strategy = fit(Net(), 3, callbacks=[_PoisonReplica(), merge])
    assert merge.merged_state is not None
    assert all(torch.isfinite(t).all() for t in merge.merged_state.values())
    states = strategy.replica_states()
    weight = merge.merged_state["net.0.weight"]
    from_0_or_2 = (weight == states[0]["net.0.weight"]) | (weight == states[2]["net.0.weight"])
    assert from_0_or_2.all()


def test_replica_loss_does_not_depend_on_gradient_accumulation() -> None:
    """With lr=0 the losses are the same in every run: accumulation must not scale them."""
    losses = []
    for accumulate in (1, 4):
        module = Net()
        module.configure_optimizers = lambda m=module: torch.optim.SGD(m.parameters(), lr=0.0)
        trainer, _ = fit(
            module,
            2,
            callbacks=[SelectionMergeCallback(validate_replicas=False)],
            accumulate_grad_batches=accumulate,
            limit_train_batches=4,
        )
        losses.append([float(trainer.callback_metrics[f"replica_{k}/train_loss"]) for k in (0, 1)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    module = Net()  # and the value is the mean loss over the replica's samples
    data = make_data()
    order = DataOrderSampler(num_samples=N, seed=3).order(0, 0)[: 4 * BATCH]
    with torch.no_grad():
        _, x, y = data[order]
        per_sample = torch.nn.functional.mse_loss(module.net(x), y, reduction="none")
    assert losses[0][0] == pytest.approx(float(per_sample.mean()), rel=1e-5)


def test_accumulation_changed_by_a_scheduler_is_checked_each_epoch() -> None:
    """8 batches per replica: accumulate 3 from epoch 1 would mix replicas 0 and 1 in a step."""
    schedule = GradientAccumulationScheduler({0: 1, 1: 3})
    with pytest.raises(MisconfigurationException, match=r"accumulate_grad_batches=3 \(epoch 1\)"):
        fit(Net(), 2, epochs=2, callbacks=[schedule])
    trainer, strategy = fit(Net(), 2, epochs=2, callbacks=[GradientAccumulationScheduler({1: 4})])
    assert trainer.global_step == 2 * (8 + 2)
    assert strategy.steps_per_replica() == 8 + 2


def test_a_resume_inside_an_epoch_keeps_the_scheduled_accumulation(tmp_path) -> None:
    """Lightning skips ``on_train_epoch_start``, where a GradientAccumulationScheduler sets the
    accumulation, in the epoch it resumes into: that epoch went on with the Trainer's own
    value (1 here), taking more steps and ending elsewhere than the uninterrupted fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(**kwargs) -> tuple[Trainer, Net]:
        module = Net(scheduler=True, dropout=0.2)
        callbacks = [GradientAccumulationScheduler({1: 2}), SelectionMergeCallback()]
        saving = "ckpt_path" not in kwargs
        if saving:
            callbacks.append(ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1))
        trainer, _ = fit(module, 2, 2, callbacks, enable_checkpointing=saving, **kwargs)
        return trainer, module

    trainer, uninterrupted = run()
    assert trainer.global_step == 16 + 8
    # saved at step 18: epoch 1, inside replica 0 (its 4 batches of 8 took 2 steps)
    resumed, module = run(ckpt_path=str(tmp_path / "epoch=1-step=18.ckpt"))
    assert resumed.global_step == 16 + 8
    final = uninterrupted.state_dict()
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, final[name]), name


class ManualNet(Net):
    """Manual optimization with a per-batch LR schedule stepped in training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lrs: list[tuple[int, float]] = []

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        opt, sched = self.optimizers(), self.lr_schedulers()
        self.lrs.append((self.trainer.strategy.active_replica, opt.param_groups[0]["lr"]))
        loss = self.loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        sched.step()
        return loss

    def configure_optimizers(self) -> tuple[list, list]:  # type: ignore[override]
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def test_manual_optimization_schedulers_follow_their_replica() -> None:
    module = ManualNet()
    _, strategy = fit(
        module, 2, epochs=2, callbacks=[SelectionMergeCallback()], limit_train_batches=3
    )
    per_epoch = [0.1, 0.05, 0.025, 0.1, 0.05, 0.025]  # epoch 0: each replica starts at 0.1
    assert module.lrs[:6] == [(r, lr) for r in (0, 1) for lr in per_epoch[:3]]
    assert [lr for _, lr in module.lrs[6:9]] == pytest.approx([0.1 * 0.5**s for s in (3, 4, 5)])
    for replica in (0, 1):
        state = strategy.replica_state(replica)
        assert state.lr_schedulers[0]["last_epoch"] == 6
        assert state.optimizers[0]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**6)


class TwoOptimizerNet(Net):
    """Manual optimization, two optimizers each stepping once a batch, each with a per-replica
    schedule spanning the fit: its length from ``steps_per_replica(**self.span)``."""

    def __init__(self, **span: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.span, self.steps = span, 0

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt, sched in zip(self.optimizers(), self.lr_schedulers()):
            opt.step()
            sched.step()
        self.steps += self.trainer.strategy.replica_of(batch_idx) == 0
        return loss

    def configure_optimizers(self) -> tuple[list, list]:  # type: ignore[override]
        self.total = self.trainer.strategy.steps_per_replica(**self.span)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (self.net[0], self.net[3])]
        return opts, [torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, self.total) for o in opts]


def test_manual_max_steps_counts_every_optimizers_steps() -> None:
    """Lightning's ``max_steps`` counts every optimizer's steps under manual optimization: 32 is
    one epoch of two optimizers here, 8 batches of each replica, where ``steps_per_replica()``
    said 16 and the schedules ended at half their learning rate."""
    with pytest.raises(MisconfigurationException, match="optimizer_steps_per_batch=N"):
        fit(TwoOptimizerNet(), 2, epochs=-1, max_steps=32)
    module = TwoOptimizerNet(optimizer_steps_per_batch=2)
    trainer, _ = fit(module, 2, epochs=-1, max_steps=32)
    assert (trainer.global_step, module.steps, module.total) == (32, 8, 8)
    assert [s.get_last_lr()[0] for s in module.lr_schedulers()] == [0.0, 0.0]
    module = TwoOptimizerNet()  # bounded by epochs alone: the replica's batches
    fit(module, 2, epochs=1)
    assert (module.steps, module.total) == (8, 8)


@pytest.mark.parametrize("max_steps", [8, 24])  # 16 steps per epoch: inside epochs 0 and 1
def test_max_steps_stopping_inside_an_epoch_is_refused(max_steps: int) -> None:
    with pytest.raises(MisconfigurationException, match=f"max_steps={max_steps}.*max_epochs"):
        fit(Net(), 2, epochs=5, max_steps=max_steps)


def test_max_steps_at_an_epoch_end_is_accepted() -> None:
    merge = SelectionMergeCallback(validate_replicas=False)
    module = Net()
    trainer, strategy = fit(module, 2, epochs=5, callbacks=[merge], max_steps=32)
    assert trainer.global_step == 32 and strategy.steps_per_replica() == 16
    assert merge.merged_state is not None
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, merge.merged_state[name])


class StopAt(Callback):
    """Sets ``should_stop`` after training batch ``batch_idx`` of ``epoch`` (like a Timer)."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.epoch, self.batch_idx = epoch, batch_idx
        self.merged: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch_idx):
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        merge = next(c for c in trainer.callbacks if isinstance(c, SelectionMergeCallback))
        if merge.merged_state is not None:
            self.merged = {n: t.clone() for n, t in merge.merged_state.items()}


def test_a_stop_inside_an_epoch_keeps_the_last_complete_merge() -> None:
    module, stop = Net(), StopAt(epoch=1, batch_idx=10)  # epoch 1, inside replica 1
    merge = SelectionMergeCallback(validate_replicas=False)
    with pytest.warns(UserWarning, match="inside epoch 1.*keeps the last merge"):
        trainer, strategy = fit(module, 2, epochs=3, callbacks=[merge, stop])
    assert trainer.global_step == 16 + 11
    assert stop.merged is not None
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, stop.merged[name]), name
    moved = strategy.replica_states()[1]["net.0.weight"]  # replica 1 trained 3 batches of epoch 1
    assert not torch.equal(moved, stop.merged["net.0.weight"])


def test_a_stop_inside_the_first_epoch_leaves_the_initial_weights() -> None:
    module, stop = Net(), StopAt(epoch=0, batch_idx=10)
    initial = {n: t.clone() for n, t in module.state_dict().items()}
    merge = SelectionMergeCallback(validate_replicas=False)
    with pytest.warns(UserWarning, match="no epoch was completed"):
        fit(module, 2, epochs=3, callbacks=[merge, stop])
    assert merge.merged_state is None
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, initial[name]), name


class EstimatingNet(Net):
    """Sets up the train loader early, from configure_optimizers (as LR schedules often do)."""

    def configure_optimizers(self) -> dict | torch.optim.Optimizer:
        self.estimate = self.trainer.estimated_stepping_batches
        self.per_replica = self.trainer.strategy.steps_per_replica()
        return super().configure_optimizers()


def test_limit_train_batches_is_per_replica_when_optimizers_estimate_the_steps() -> None:
    module = EstimatingNet()
    trainer, strategy = fit(module, 3, epochs=2, limit_train_batches=2)
    assert strategy.batches_per_replica == 2 and trainer.num_training_batches == 6
    assert (module.estimate, module.per_replica, trainer.global_step) == (12, 4, 12)
    assert {b // 2 for _, b, _ in module.seen} == {0, 1, 2}  # every replica trained


class _EpochEndValidation(Net):
    """Gathers in validation_step, reduces and logs in on_validation_epoch_end."""

    def __init__(self) -> None:
        super().__init__()
        self.outs: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def validation_step(self, batch, batch_idx):
        self.outs.append(self.loss(batch).detach())

    def on_validation_epoch_end(self) -> None:
        self.sizes.append(len(self.outs))
        self.log("val_epoch_end", torch.stack(self.outs).mean())
        self.outs.clear()


def test_replica_validation_keeps_epoch_end_metrics_apart() -> None:
    """Each replica's pass is framed by the module's epoch hooks: the merged model's epoch-end
    metric sees only its own batches, and each replica gets its own."""
    results = {}
    for validate in (False, True):
        module = _EpochEndValidation()
        callback = SelectionMergeCallback(validate_replicas=validate)
        trainer, _ = fit(module, 3, epochs=1, callbacks=[callback], val=True, limit_train_batches=2)
        results[validate] = (module.sizes, trainer.callback_metrics)
    sizes, metrics = results[True]
    assert sizes == results[False][0] * 4  # three replica passes, then the merged model's
    assert float(metrics["val_epoch_end"]) == float(results[False][1]["val_epoch_end"])
    assert all(f"replica_{k}/val_epoch_end" in metrics for k in range(3))


class _LossScales(Callback):
    """(epoch, replica, the loss scale its backward used) at every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        replica = trainer.strategy.active_replica
        self.seen.append(
            (trainer.current_epoch, replica, trainer.precision_plugin.scaler.get_scale())
        )


def test_each_replica_keeps_its_own_mixed_precision_loss_scale() -> None:
    """fp16's loss scaler backs off on overflows: replica 0 must not hand its calibrated scale
    to replica 1 (which would skip none of its first steps, a bias of the data order)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def scales(epochs: int) -> dict[tuple[int, int], list[float]]:
        recorder = _LossScales()
        fit(
            Net(),
            2,
            epochs=epochs,
            callbacks=[SelectionMergeCallback(validate_replicas=False), recorder],
            plugins=[MixedPrecision("16-mixed", "cpu")],
            limit_train_batches=6,
        )
        out: dict[tuple[int, int], list[float]] = {}
        for epoch, replica, scale in recorder.seen:
            out.setdefault((epoch, replica), []).append(scale)
        return out

    seen = scales(epochs=2)
    initial = seen[(0, 0)][0]
    assert seen[(0, 0)][-1] < initial  # overflows made replica 0's scaler back off
    assert seen[(0, 1)][0] == initial  # replica 1 starts from the initial scale, not replica 0's
    # in epoch 1 each replica goes on from its own scale after its last step of epoch 0 (the
    # same, or halved if that step overflowed)
    for replica in (0, 1):
        last = seen[(0, replica)][-1]
        assert seen[(1, replica)][0] in (last, last / 2), (replica, seen)


class _StepSamples(Callback):
    """The sample indices of every optimizer step, per (epoch, replica)."""

    def __init__(self) -> None:
        self.steps: dict[tuple[int, int], list[frozenset[int]]] = {}
        self._pending: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._pending += batch[0].tolist()
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            key = (trainer.current_epoch, trainer.strategy.active_replica)
            self.steps.setdefault(key, []).append(frozenset(self._pending))
            self._pending = []


def test_fixed_batches_fix_the_samples_of_each_optimizer_step_with_accumulation() -> None:
    recorder = _StepSamples()
    strategy = DataOrderEnsemble(num_replicas=3, seed=3, fixed_batches=True)
    fit(Net(), 3, epochs=2, callbacks=[recorder], strategy=strategy, accumulate_grad_batches=2)
    steps = recorder.steps
    reference = set(steps[(0, 0)])
    assert len(reference) == len(steps[(0, 0)]) > 1
    for key, order in steps.items():
        assert set(order) == reference, key  # the same optimizer-step batches everywhere
    assert len({tuple(order) for order in steps.values()}) > 1  # in different orders


def test_fixed_batches_with_an_accumulation_scheduler_is_refused() -> None:
    strategy = DataOrderEnsemble(num_replicas=2, seed=3, fixed_batches=True)
    with pytest.raises(MisconfigurationException, match="GradientAccumulationScheduler"):
        fit(
            Net(),
            2,
            strategy=strategy,
            callbacks=[GradientAccumulationScheduler({0: 1, 1: 2})],
        )


class _CountSteps(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


@pytest.mark.parametrize(
    "schedule, max_steps, match",
    [
        ({0: 1, 1: 3}, -1, r"accumulate_grad_batches=3 \(epoch 1\)"),
        ({0: 2, 1: 1}, 16, "max_steps=16 .* end at optimizer steps 8 and 24"),
    ],
)
def test_an_accumulation_schedule_is_checked_before_training(schedule, max_steps, match) -> None:
    """8 batches per replica, K = 2: the bad epoch is refused at the start, not when reached."""
    counter = _CountSteps()
    callbacks = [GradientAccumulationScheduler(schedule), counter]
    with pytest.raises(MisconfigurationException, match=match):
        fit(Net(), 2, epochs=3, callbacks=callbacks, max_steps=max_steps, limit_train_batches=8)
    assert counter.batches == 0


def test_steps_per_replica_follows_each_fit_of_a_reused_trainer() -> None:
    class Recording(Net):
        def configure_optimizers(self):
            self.per_replica = self.trainer.strategy.steps_per_replica()
            return super().configure_optimizers()

    strategy = DataOrderEnsemble(num_replicas=2, seed=3)
    trainer = ensemble_trainer(strategy, [SelectionMergeCallback(validate_replicas=False)])
    for samples in (60, 120):
        module = Recording()
        trainer.fit(module, DataLoader(make_data(samples), batch_size=BATCH))
        assert module.per_replica == strategy.batches_per_replica == -(-samples // BATCH)


@pytest.mark.parametrize("averaging", ["EMAWeightAveraging", "StochasticWeightAveraging"])
def test_weight_averaging_over_steps_is_refused(averaging: str) -> None:
    """EMA or SWA of the live module would average the K replicas' weights in turn."""
    import lightning.pytorch.callbacks as callbacks

    kwargs = {"swa_lrs": 0.01} if averaging == "StochasticWeightAveraging" else {}
    callback = getattr(callbacks, averaging)(**kwargs)
    with pytest.raises(MisconfigurationException, match=f"{averaging} averages the live"):
        fit(Net(), 2, callbacks=[SelectionMergeCallback(), callback])


def test_the_tuners_are_refused() -> None:
    from lightning.pytorch.callbacks import LearningRateFinder

    with pytest.raises(MisconfigurationException, match="LearningRateFinder.*plain strategy"):
        fit(Net(), 2, callbacks=[LearningRateFinder(num_training_steps=5)])


def test_resuming_with_other_per_replica_schedulers_is_refused(tmp_path) -> None:
    """A checkpoint of an automatic-optimization fit (its epoch scheduler shared) resumed by a
    manual-optimization module (which swaps every scheduler with its replica)."""

    class EpochScheduled(Net):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(EpochScheduled(), 2, callbacks=[saver], enable_checkpointing=True, limit_train_batches=3)
    with pytest.raises(MisconfigurationException, match="swaps 1"):
        fit(ManualNet(), 2, epochs=2, ckpt_path=str(tmp_path / "last.ckpt"), limit_train_batches=3)


def test_fixed_batches_resumed_with_another_step_size_is_refused(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    strategy = DataOrderEnsemble(num_replicas=2, seed=3, fixed_batches=True)
    fit(Net(), 2, strategy=strategy, callbacks=[saver], enable_checkpointing=True)
    resumed = DataOrderEnsemble(num_replicas=2, seed=3, fixed_batches=True)
    with pytest.raises(MisconfigurationException, match=f"fixed {BATCH} samples .* this fit"):
        fit(
            Net(),
            2,
            epochs=2,
            strategy=resumed,
            ckpt_path=str(tmp_path / "last.ckpt"),
            accumulate_grad_batches=2,
        )
    # the same settings resume
    again = DataOrderEnsemble(num_replicas=2, seed=3, fixed_batches=True)
    fit(Net(), 2, epochs=2, strategy=again, ckpt_path=str(tmp_path / "last.ckpt"))


def test_a_train_loader_sampler_that_does_more_than_order_is_named_when_replaced() -> None:
    from torch.utils.data import WeightedRandomSampler

    data = make_data()
    weighted = WeightedRandomSampler([1.0] * len(data), num_samples=16)
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=2, seed=3), [])
    with pytest.warns(UserWarning, match="train loader's WeightedRandomSampler is replaced"):
        trainer.fit(Net(), DataLoader(data, batch_size=BATCH, sampler=weighted))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=2, seed=3), [])
        trainer.fit(Net(), DataLoader(data, batch_size=BATCH, shuffle=True))
    assert not [w for w in caught if "is replaced" in str(w.message)]


def test_an_ensemble_without_a_merge_says_so() -> None:
    with pytest.warns(UserWarning, match="without SelectionMergeCallback: the replicas are not"):
        fit(Net(), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Net(), 2, callbacks=[SelectionMergeCallback()])
    assert not [w for w in caught if "without SelectionMergeCallback" in str(w.message)]


def test_a_lazy_parameter_not_initialised_at_train_start_is_named() -> None:
    class Lazy(Net):
        def __init__(self) -> None:
            super().__init__()
            self.net[0] = torch.nn.LazyLinear(8)

    with pytest.raises(MisconfigurationException, match="net.0.weight .a lazy module"):
        fit(Lazy(), 2, callbacks=[SelectionMergeCallback()])
