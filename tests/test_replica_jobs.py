"""Replica jobs (``ReplicaJob``): K ordinary fits + a merge of their snapshots equal one
``DataOrderEnsemble`` fit with ``SelectionMergeCallback``, bit for bit, at every epoch."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from ensemble_support import BATCH, Net, child_env, ensemble_trainer, make_data
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_selmerge import DataOrderEnsemble, ReplicaJob, SelectionMergeCallback
from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.ensemble.replica_snapshots import SnapshotMismatch, read_record
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler
from lightning_selmerge.merging import (
    ParameterSelection,
    WeightedAverage,
    merge_checkpoints,
    merge_state_dicts,
)

warnings.filterwarnings("ignore", ".*does not have many workers.*")

TESTS = Path(__file__).parent
K, EPOCHS, ORDER_SEED, FIT_SEED, MERGE_SEED = 3, 2, 3, 5, 11
METHODS = {
    "selection_resample1": ("selection", ParameterSelection(resample=1), {"resample": 1}),
    "average": ("average", WeightedAverage(), {}),
}


def loaders() -> tuple[DataLoader, DataLoader]:
    data = make_data()
    return DataLoader(data, batch_size=BATCH, shuffle=True), DataLoader(data, batch_size=30)


def module() -> Net:
    """Dropout on (RNG matters) and a per-replica step-interval LR schedule."""
    net = Net(scheduler=True, dropout=0.3)  # its weights are seeded in __init__
    seed_everything(FIT_SEED)  # the fit's seed, from which every replica's pass is seeded
    return net


def job_trainer(job: ReplicaJob, epochs: int = EPOCHS, **kwargs) -> Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": epochs,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    callbacks = [job, *settings.pop("callbacks", [])]
    return Trainer(callbacks=callbacks, **settings)


def snapshot(snapshot_dir: Path, epoch: int, replica: int) -> Path:
    return snapshot_dir / f"epoch_{epoch:03d}" / f"replica_{replica:03d}.safetensors"


def merged_epoch(epoch_dir: Path, out: Path, base: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    """``merge_epoch`` with the callbacks' merge of these tests (selection + resample(1),
    ``MERGE_SEED``), as the tensors it wrote."""
    from lightning_selmerge.merging.snapshots import merge_epoch

    method = ParameterSelection(resample=1)
    written = merge_epoch(epoch_dir, out, method=method, base=base, seed=MERGE_SEED, **kwargs)
    return load_file(written / "model.safetensors")


def equal_states(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in expected)


class RecordEpochs(Callback):
    """Every epoch's replica states and merge (after the merge at the epoch's last batch)."""

    def __init__(self, merge: SelectionMergeCallback) -> None:
        self.merge = merge
        self.replicas: list[list[dict[str, torch.Tensor]]] = []
        self.merged: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states = trainer.strategy.replica_states()
        self.replicas.append([{n: t.clone() for n, t in s.items()} for s in states])
        self.merged.append({n: t.clone() for n, t in self.merge.merged_state.items()})


@pytest.fixture(scope="module")
def job_snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The K replica jobs of one run, one after another, into one snapshot_dir."""
    snapshot_dir = tmp_path_factory.mktemp("snapshots")
    for replica in range(K):
        job = ReplicaJob(K, replica, seed=ORDER_SEED, snapshot_dir=snapshot_dir)
        job_trainer(job).fit(module(), *loaders())
    return snapshot_dir


@pytest.mark.parametrize("method", sorted(METHODS))
def test_replica_jobs_merge_to_the_ensemble_bits(
    method: str, job_snapshots: Path, tmp_path: Path
) -> None:
    name, merge_method, options = METHODS[method]
    merge = SelectionMergeCallback(method=name, seed=MERGE_SEED, validate_replicas=False, **options)
    record = RecordEpochs(merge)
    strategy = DataOrderEnsemble(num_replicas=K, seed=ORDER_SEED)
    trainer = ensemble_trainer(strategy, [merge, record], max_epochs=EPOCHS)
    trainer.fit(module(), *loaders())
    base = job_snapshots / "initial.safetensors"
    assert equal_states(load_file(base), strategy.initial_state.module)
    for epoch in range(EPOCHS):
        paths = [snapshot(job_snapshots, epoch, k) for k in range(K)]
        for replica, path in enumerate(paths):
            assert equal_states(load_file(path), record.replicas[epoch][replica]), (epoch, replica)
        out = merge_checkpoints(
            paths, tmp_path / f"merged_{epoch}", method=merge_method, base=base, seed=MERGE_SEED
        )
        assert equal_states(load_file(out / "model.safetensors"), record.merged[epoch]), epoch


def test_dropout_makes_the_fit_seed_matter(job_snapshots: Path, tmp_path: Path) -> None:
    """The control: another seed_everything gives replica 0 other weights (dropout draws)."""
    net = Net(scheduler=True, dropout=0.3)
    seed_everything(FIT_SEED + 1)
    job_trainer(ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path), epochs=1).fit(
        net, *loaders()
    )
    other = load_file(snapshot(tmp_path, 0, 0))
    assert not equal_states(other, load_file(snapshot(job_snapshots, 0, 0)))


def test_records_say_which_run_and_replica(job_snapshots: Path) -> None:
    epoch_record = json.loads((job_snapshots / "epoch_001" / "selmerge.json").read_text())
    assert epoch_record == {
        "num_replicas": K,
        "seed": ORDER_SEED,
        "epoch": 1,
        "fixed_batches": False,
    }
    records = [read_record(snapshot(job_snapshots, 1, k)) for k in range(K)]
    assert [r["replica"] for r in records] == list(range(K))
    assert {r["initial_fingerprint"] for r in records} == {
        read_record(job_snapshots / "initial.safetensors")["initial_fingerprint"]
    }
    assert all(r["epoch"] == 1 and r["global_step"] == 2 * 8 for r in records)
    recipe = records[0]["recipe"]
    assert all(r["recipe"] == recipe for r in records)
    assert recipe["module"] == "ensemble_support.Net"
    assert recipe["data"] == {
        "size": len(make_data()),
        "batch_size": BATCH,
        "drop_last": False,
        "ranks": 1,
        "batches_per_epoch": 8,
    }
    (group,) = recipe["optimizers"][0]["groups"]
    assert group["lr"] == group["initial_lr"] == 0.05
    assert group["num_tensors"] == len(list(Net().parameters()))
    (scheduler,) = recipe["lr_schedulers"]
    assert scheduler["class"] == "torch.optim.lr_scheduler.StepLR"
    assert scheduler["interval"] == "step"
    assert scheduler["settings"]["step_size"] == 3 and scheduler["settings"]["gamma"] == 0.5
    assert recipe["trainer"]["max_epochs"] == EPOCHS


def _schedule_recipe(schedule: Any) -> dict:
    """The recipe of a fit whose one scheduler ``schedule(optimizer)`` builds."""
    from types import SimpleNamespace

    from lightning_selmerge.ensemble.recipe import training_recipe

    net = Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    config = SimpleNamespace(scheduler=schedule(optimizer), interval="step", frequency=1)
    trainer = SimpleNamespace(
        optimizers=[optimizer],
        lr_scheduler_configs=[config],
        max_epochs=1,
        max_steps=-1,
        accumulate_grad_batches=1,
        gradient_clip_val=None,
        gradient_clip_algorithm=None,
        precision="32-true",
    )
    return training_recipe(trainer, net)


def test_schedule_functions_and_chained_schedulers_are_in_the_recipe() -> None:
    """transformers' warmup schedules are LambdaLRs over a partial, whose step counts the
    scheduler's state does not hold; SequentialLR keeps its milestones and schedulers in
    ``_``-prefixed state: all of them tell two jobs' schedules apart."""
    from transformers import get_linear_schedule_with_warmup

    from lightning_selmerge.merging.snapshot_records import recipe_differences

    lr = torch.optim.lr_scheduler

    def warmup(steps: int) -> Any:
        return lambda opt: get_linear_schedule_with_warmup(opt, steps, 100)

    def sequential(milestone: int) -> Any:
        return lambda opt: lr.SequentialLR(
            opt,
            [lr.LinearLR(opt, 0.1, total_iters=milestone), lr.CosineAnnealingLR(opt, 50)],
            milestones=[milestone],
        )

    assert _schedule_recipe(warmup(10)) == _schedule_recipe(warmup(10))
    assert "num_warmup_steps: 10 vs 20" in recipe_differences(
        _schedule_recipe(warmup(10)), _schedule_recipe(warmup(20))
    )
    assert _schedule_recipe(sequential(5)) == _schedule_recipe(sequential(5))
    differences = recipe_differences(
        _schedule_recipe(sequential(5)), _schedule_recipe(sequential(6))
    )
    assert "_milestones" in differences and "total_iters: 5 vs 6" in differences

    class Warmup:  # a callable object: its attributes are the settings
        def __init__(self, steps: int) -> None:
            self.steps = steps

        def __call__(self, step: int) -> float:
            return min(1.0, (step + 1) / self.steps)

    def lambda_of(steps: int) -> Any:
        return lambda opt: lr.LambdaLR(opt, Warmup(steps))

    assert "state.steps: 10 vs 1000" in recipe_differences(
        _schedule_recipe(lambda_of(10)), _schedule_recipe(lambda_of(1000))
    )

    def multistep(*milestones: int) -> Any:
        return lambda opt: lr.MultiStepLR(opt, list(milestones))

    assert "milestones" in recipe_differences(  # a Counter keyed by int steps
        _schedule_recipe(multistep(3, 5)), _schedule_recipe(multistep(30, 50))
    )


class SlowerDecay(Net):
    """The run's module with another LR schedule (gamma 0.9 instead of 0.5)."""

    def configure_optimizers(self) -> dict:
        config = super().configure_optimizers()
        config["lr_scheduler"]["scheduler"].gamma = 0.9
        return config


def test_a_job_with_other_settings_is_refused_at_its_start(job_snapshots: Path) -> None:
    """A job started after others (here with another batch size) is refused before training."""
    train, val = loaders()
    job = ReplicaJob(K, 1, seed=ORDER_SEED, snapshot_dir=job_snapshots)
    with pytest.raises(SnapshotMismatch, match=r"other settings .*data\.batch_size: 8 vs 4"):
        job_trainer(job).fit(module(), DataLoader(train.dataset, batch_size=4), val)


def test_jobs_started_at_once_with_other_settings_are_refused_at_the_merge(
    job_snapshots: Path, tmp_path: Path
) -> None:
    """Jobs that ran side by side cannot check each other: the merge compares their recipes."""
    from lightning_selmerge.merging import MergeError
    from lightning_selmerge.merging.snapshots import merge_epoch

    odd = tmp_path / "odd"
    net = SlowerDecay(scheduler=True, dropout=0.3)
    seed_everything(FIT_SEED)
    job_trainer(ReplicaJob(K, 2, seed=ORDER_SEED, snapshot_dir=odd), epochs=1).fit(net, *loaders())
    epoch = tmp_path / "epoch_000"
    epoch.mkdir()
    for replica in range(K):
        source = snapshot(odd if replica == 2 else job_snapshots, 0, replica)
        (epoch / source.name).write_bytes(source.read_bytes())
    odd = r"settings\.gamma: 0\.5 vs 0\.9.*rerun replica_002\.safetensors with the others'"
    with pytest.raises(MergeError, match=r"different settings.*" + odd):
        merge_epoch(epoch, tmp_path / "merged", base=job_snapshots / "initial.safetensors")
    assert not (tmp_path / "merged").exists()


def test_the_printed_base_initial_names_a_file_snapshot_too(
    job_snapshots: Path, tmp_path: Path
) -> None:
    """A replica job prints ``--base SNAPSHOT_DIR/initial``, which is ``initial.safetensors``
    when the snapshots are files."""
    from lightning_selmerge.merging.snapshots import merge_epoch

    merged = [
        load_file(
            merge_epoch(
                job_snapshots / "epoch_000",
                tmp_path / name,
                method=ParameterSelection(resample=1),
                base=job_snapshots / name,
                seed=MERGE_SEED,
            )
            / "model.safetensors"
        )
        for name in ("initial", "initial.safetensors")
    ]
    assert equal_states(*merged)


class SeenBatches(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.seen.append((trainer.current_epoch, batch[0].tolist()))


def test_job_trains_on_its_replica_order_with_limits(tmp_path: Path) -> None:
    seen = SeenBatches()
    job = ReplicaJob(4, 2, seed=ORDER_SEED, snapshot_dir=tmp_path)
    trainer = job_trainer(job, epochs=2, limit_train_batches=3, callbacks=[seen])
    trainer.fit(Net(), *loaders())
    orders = DataOrderSampler(num_samples=60, seed=ORDER_SEED)
    for epoch in range(2):
        got = [idx for e, batch in seen.seen if e == epoch for idx in batch]
        assert got == orders.order(epoch, 2).tolist()[: 3 * BATCH]
    assert snapshot(tmp_path, 1, 2).is_file()


def test_resume_inside_an_epoch_gives_the_same_bits(job_snapshots: Path, tmp_path: Path) -> None:
    """Killed after step 11 (inside epoch 1), resumed from that checkpoint: same snapshots."""
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    snapshot_dir = tmp_path / "snapshots"
    job = ReplicaJob(K, 1, seed=ORDER_SEED, snapshot_dir=snapshot_dir)
    job_trainer(job, callbacks=[checkpoints], enable_checkpointing=True).fit(module(), *loaders())
    snapshot(snapshot_dir, 1, 1).unlink()  # as if killed at step 11
    before = snapshot(snapshot_dir, 0, 1).stat().st_mtime_ns
    job = ReplicaJob(K, 1, seed=ORDER_SEED, snapshot_dir=snapshot_dir)
    net = Net(scheduler=True, dropout=0.3)  # other weights would be replaced by the checkpoint
    seed_everything(FIT_SEED + 7)  # the fit's seed comes from the checkpoint, not from here
    job_trainer(job).fit(net, *loaders(), ckpt_path=tmp_path / "ckpt" / "step=11.ckpt")
    assert snapshot(snapshot_dir, 0, 1).stat().st_mtime_ns == before  # not written again
    assert equal_states(
        load_file(snapshot(snapshot_dir, 1, 1)), load_file(snapshot(job_snapshots, 1, 1))
    )


def test_resume_writes_the_snapshot_a_killed_job_missed(
    job_snapshots: Path, tmp_path: Path
) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    job = ReplicaJob(K, 2, seed=ORDER_SEED, snapshot_dir=tmp_path)
    job_trainer(job, epochs=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        module(), *loaders()
    )
    snapshot(tmp_path, 0, 2).unlink()  # as if killed between the checkpoint and the snapshot
    job = ReplicaJob(K, 2, seed=ORDER_SEED, snapshot_dir=tmp_path)
    job_trainer(job).fit(module(), *loaders(), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    for epoch in range(EPOCHS):
        assert equal_states(
            load_file(snapshot(tmp_path, epoch, 2)), load_file(snapshot(job_snapshots, epoch, 2))
        )


def test_a_job_resumed_with_other_settings_is_refused_at_the_merge(
    job_snapshots: Path, tmp_path: Path
) -> None:
    """Resumed at an epoch's end with another batch size: the records after the resume say
    so, and the merge of that epoch refuses the replica (they kept the start's recipe)."""
    from lightning_selmerge.merging import MergeError
    from lightning_selmerge.merging.snapshots import merge_epoch

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    job = ReplicaJob(K, 2, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    job_trainer(job, epochs=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        module(), *loaders()
    )
    train, val = loaders()
    job = ReplicaJob(K, 2, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    job_trainer(job).fit(
        module(),
        DataLoader(train.dataset, batch_size=4),
        val,
        ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt",
    )
    epoch = tmp_path / "epoch_001"
    epoch.mkdir()
    for replica in range(K):
        source = snapshot(tmp_path / "s" if replica == 2 else job_snapshots, 1, replica)
        (epoch / source.name).write_bytes(source.read_bytes())
    with pytest.raises(MergeError, match=r"different settings.*data\.batch_size: 8 vs 4"):
        merge_epoch(epoch, tmp_path / "merged")


def test_a_job_resumed_to_extend_the_fit_stays_one_of_its_run(tmp_path: Path) -> None:
    """Replica 0 resumed with a larger max_epochs (to train on): its later records keep the
    fit's length it started with, so the run's other jobs are not refused."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    job = ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    job_trainer(job, epochs=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        module(), *loaders()
    )
    job = ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    job_trainer(job, epochs=2).fit(module(), *loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert read_record(snapshot(tmp_path / "s", 1, 0))["recipe"]["trainer"]["max_epochs"] == 1
    job_trainer(ReplicaJob(K, 1, seed=ORDER_SEED, snapshot_dir=tmp_path / "s"), epochs=1).fit(
        module(), *loaders()
    )


def test_another_replicas_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    job = ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    job_trainer(job, epochs=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        Net(), *loaders()
    )
    job = ReplicaJob(K, 1, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    with pytest.raises(MisconfigurationException, match="replica=0, this one has replica=1"):
        job_trainer(job).fit(Net(), *loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # its own checkpoint, but another snapshot_dir: a finished fit would resume to nothing
    job = ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path / "elsewhere")
    with pytest.raises(MisconfigurationException, match="writing its snapshots to .*/s, this"):
        job_trainer(job).fit(Net(), *loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "s").rename(tmp_path / "moved")  # moved (or mounted elsewhere): its own again
    job = ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path / "moved")
    job_trainer(job).fit(Net(), *loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


@pytest.mark.parametrize(
    ("num_replicas", "replica", "message"),
    [
        (4, 4, "replica=4 is not one of the 4 replicas: use 0 .. 3"),
        (4, -1, "replica=-1 is not one of the 4 replicas"),
        (1, 0, "num_replicas=1; a replica job is one of K >= 2"),
        (2.5, 0, "num_replicas=2.5 must be an int"),
        (True, 0, "num_replicas=True must be an int"),
    ],
)
def test_bad_replica_arguments(num_replicas, replica: int, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        ReplicaJob(num_replicas, replica, seed=0, snapshot_dir=tmp_path)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"num_replicas": 4}, "num_replicas=3 where this job has num_replicas=4"),
        ({"seed": 9}, f"seed={ORDER_SEED} where this job has seed=9"),
    ],
)
def test_snapshot_dir_of_another_run_is_refused(
    other: dict, message: str, job_snapshots: Path
) -> None:
    settings = {"num_replicas": K, "replica": 0, "seed": ORDER_SEED, **other}
    job = ReplicaJob(**settings, snapshot_dir=job_snapshots)
    with pytest.raises(SnapshotMismatch, match=message):
        job_trainer(job).fit(Net(), *loaders())


def test_another_initial_model_is_refused(job_snapshots: Path) -> None:
    net = Net()
    with torch.no_grad():
        net.net[0].weight.add_(1.0)
    job = ReplicaJob(K, 1, seed=ORDER_SEED, snapshot_dir=job_snapshots)
    with pytest.raises(SnapshotMismatch, match="another initial model"):
        job_trainer(job).fit(net, *loaders())


def test_ensemble_pieces_are_refused(tmp_path: Path) -> None:
    job = ReplicaJob(K, 0, seed=0, snapshot_dir=tmp_path)
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=K), [job])
    with pytest.raises(MisconfigurationException, match="use one or the other"):
        trainer.fit(Net(), *loaders())
    sync = SelectionMergeCallback(sync_replicas=True)
    with pytest.raises(MisconfigurationException, match="sync_replicas=True resets every"):
        job_trainer(job, callbacks=[sync]).fit(Net(), *loaders())
    with pytest.raises(MisconfigurationException, match="merge --epoch_dir"):
        job_trainer(job, callbacks=[SelectionMergeCallback()]).fit(Net(), *loaders())
    assert not any(tmp_path.iterdir())  # refused before anything was written


class TinyGPT2(LightningModule):
    """A GPT-2 with tied input/output embeddings and dropout, kept as ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=12, vocab_size=40)
        self.model = GPT2LMHeadModel(config)  # dropout 0.1 everywhere
        self.model.train()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def token_loader() -> DataLoader:
    tokens = torch.randint(0, 40, (24, 12), generator=torch.Generator().manual_seed(1))
    return DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=6, shuffle=True)


def gpt2() -> TinyGPT2:
    net = TinyGPT2()
    seed_everything(FIT_SEED)
    return net


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RecordEpochs]:
    """Two replica jobs of a tied GPT-2 (save_pretrained snapshots) and the ensemble fit."""
    snapshot_dir = tmp_path_factory.mktemp("gpt2")
    for replica in range(2):
        job = ReplicaJob(2, replica, seed=ORDER_SEED, snapshot_dir=snapshot_dir)
        job_trainer(job).fit(gpt2(), token_loader())
    merge = SelectionMergeCallback(resample=1, seed=MERGE_SEED, validate_replicas=False)
    record = RecordEpochs(merge)
    strategy = DataOrderEnsemble(num_replicas=2, seed=ORDER_SEED)
    ensemble_trainer(strategy, [merge, record], max_epochs=EPOCHS).fit(gpt2(), token_loader())
    return snapshot_dir, record


def test_tied_gpt2_jobs_hold_the_ensemble_replicas(gpt2_run: tuple[Path, RecordEpochs]) -> None:
    """Per-replica bits, and the merge of the snapshots under the module's names."""
    snapshot_dir, record = gpt2_run
    initial = snapshot_dir / "initial"
    assert {"config.json", "model.safetensors", "selmerge.json"} <= {
        p.name for p in initial.iterdir()
    }
    for epoch in range(EPOCHS):  # the merge draws under "model." + the directory's names
        epoch_record = json.loads(
            (snapshot_dir / f"epoch_{epoch:03d}" / "selmerge.json").read_text()
        )
        assert epoch_record["draw_prefix"] == "model."
    saved = load_file(initial / "model.safetensors")
    assert "lm_head.weight" not in saved  # save_pretrained keeps one name per tie group
    base = TinyGPT2()
    base.model.load_state_dict(saved, strict=False)
    for epoch in range(EPOCHS):
        paths = [snapshot_dir / f"epoch_{epoch:03d}" / f"replica_{k:03d}" for k in range(2)]
        nets = []
        for replica, path in enumerate(paths):
            net = TinyGPT2()
            net.model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
            assert equal_states(net.state_dict(), record.replicas[epoch][replica])
            nets.append(net)
        merged = merge_state_dicts(
            [net.state_dict() for net in nets],
            base=base.state_dict(),
            method=ParameterSelection(resample=1),
            seed=MERGE_SEED,
        )
        assert equal_states(merged, record.merged[epoch]), epoch


def test_tied_gpt2_directory_merge_equals_the_ensemble_merge(
    gpt2_run: tuple[Path, RecordEpochs], tmp_path: Path
) -> None:
    snapshot_dir, record = gpt2_run
    for epoch in range(EPOCHS):
        merged = merged_epoch(
            snapshot_dir / f"epoch_{epoch:03d}",
            tmp_path / f"merged_{epoch}",
            snapshot_dir / "initial",
        )
        for name, tensor in merged.items():
            assert torch.equal(tensor, record.merged[epoch][f"model.{name}"]), (epoch, name)


def test_rules_written_for_the_modules_names_apply_to_the_snapshots(
    gpt2_run: tuple[Path, RecordEpochs], tmp_path: Path
) -> None:
    """A rule anchored on the in-process names (``^model\\.``) applies to the save_pretrained
    snapshots, whose names lack the prefix: the merge of the epoch equals the ensemble's."""
    from lightning_selmerge.merging import MergeRule, WeightedAverage

    snapshot_dir, _ = gpt2_run
    rules = [MergeRule(r"^model\.transformer\.(h\.0\.ln|ln_f)", WeightedAverage())]
    merge = SelectionMergeCallback(
        resample=1, seed=MERGE_SEED, rules=rules, validate_replicas=False
    )
    record = RecordEpochs(merge)
    strategy = DataOrderEnsemble(num_replicas=2, seed=ORDER_SEED)
    ensemble_trainer(strategy, [merge, record], max_epochs=1).fit(gpt2(), token_loader())
    merged = merged_epoch(
        snapshot_dir / "epoch_000", tmp_path / "merged", snapshot_dir / "initial", rules=rules
    )
    replicas = record.replicas[0]
    name = "transformer.ln_f.weight"
    mean = (replicas[0][f"model.{name}"] + replicas[1][f"model.{name}"]) / 2
    assert torch.equal(merged[name], mean)  # the rule applied
    for name, tensor in merged.items():
        assert torch.equal(tensor, record.merged[0][f"model.{name}"]), name


class TiedNet(LightningModule):
    """An output projection registered before the embedding tied to it: the state dict names
    the tie group ``proj.weight`` first, its canonical name is ``emb.weight``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 40, bias=False)
        self.emb = torch.nn.Embedding(40, 16)
        self.emb.weight = self.proj.weight
        self.drop = torch.nn.Dropout(0.1)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        logits = self.proj(self.drop(self.emb(tokens[:, :-1])))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def test_a_tie_group_snapshot_merges_under_the_ensembles_draws(tmp_path: Path) -> None:
    """A file snapshot keeps a tie group under the name the merge keys its draws by (the
    canonical one), not the state dict's first: its merge equals the ensemble's."""

    def tied() -> TiedNet:
        net = TiedNet()
        seed_everything(FIT_SEED)
        return net

    snapshot_dir = tmp_path / "snapshots"
    for replica in range(2):
        job = ReplicaJob(2, replica, seed=ORDER_SEED, snapshot_dir=snapshot_dir)
        job_trainer(job, epochs=1).fit(tied(), token_loader())
    merge = SelectionMergeCallback(resample=1, seed=MERGE_SEED, validate_replicas=False)
    strategy = DataOrderEnsemble(num_replicas=2, seed=ORDER_SEED)
    ensemble_trainer(strategy, [merge]).fit(tied(), token_loader())
    assert set(load_file(snapshot(snapshot_dir, 0, 1))) == {"emb.weight"}
    merged = merged_epoch(
        snapshot_dir / "epoch_000", tmp_path / "merged", snapshot_dir / "initial.safetensors"
    )
    assert torch.equal(
        merged["emb.weight"].view(torch.uint8), merge.merged_state["emb.weight"].view(torch.uint8)
    )


class LoraGPT2(TinyGPT2):
    """The tiny GPT-2 as a PEFT LoRA model: its base frozen, rank-2 adapters on ``c_attn``."""

    def __init__(self) -> None:
        super().__init__()
        import peft

        lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0)
        self.model = peft.get_peft_model(self.model, lora)
        self.model.train()


def lora_gpt2() -> LoraGPT2:
    net = LoraGPT2()
    seed_everything(FIT_SEED)
    return net


def test_lora_jobs_snapshot_the_adapters_and_merge_to_the_ensemble_bits(tmp_path: Path) -> None:
    """A PEFT model's snapshots hold its trained tensors, not its frozen base (save_pretrained
    would write an adapter directory, which the merge does not read); their merge equals the
    ensemble's."""

    snapshot_dir = tmp_path / "snapshots"
    for replica in range(2):
        job = ReplicaJob(2, replica, seed=ORDER_SEED, snapshot_dir=snapshot_dir)
        job_trainer(job, epochs=1).fit(lora_gpt2(), token_loader())
    merge = SelectionMergeCallback(resample=1, seed=MERGE_SEED, validate_replicas=False)
    strategy = DataOrderEnsemble(num_replicas=2, seed=ORDER_SEED)
    ensemble_trainer(strategy, [merge]).fit(lora_gpt2(), token_loader())
    trained = {n for n, p in LoraGPT2().named_parameters() if p.requires_grad}
    for path in [snapshot_dir / "initial", snapshot(snapshot_dir, 0, 1)]:
        assert set(load_file(path.with_suffix(".safetensors"))) == trained, path
    merged = merged_epoch(
        snapshot_dir / "epoch_000", tmp_path / "merged", snapshot_dir / "initial.safetensors"
    )
    assert set(merged) == trained
    for name, tensor in merged.items():
        assert torch.equal(tensor, merge.merged_state[name]), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_replica_job_on_two_ranks(strategy: str, tmp_path: Path) -> None:
    """Rank r trains batches r, r + 2, ... of replica k's order (as a replica sharded over 2
    ranks in the ensemble); global rank 0 alone writes the full weights (under FSDP2, gathered
    from the ranks' shards)."""
    env = child_env(TESTS.parent, TESTS)
    args = [str(tmp_path), "2", "4", "3", *(["fsdp2"] if strategy == "fsdp2" else [])]
    proc = subprocess.run(
        [sys.executable, str(TESTS / "replica_job_worker.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=False) for r in range(2)]
    orders = DataOrderSampler(num_samples=60, seed=ORDER_SEED)
    for rank, result in enumerate(ranks):
        sampler = EnsembleBatchSampler(
            orders, 4, BATCH, replicas=[3], num_shards=2, shard_rank=rank
        )
        for epoch in range(2):
            got = [batch for e, batch in result["seen"] if e == epoch]
            assert got == sampler.replica_batches(epoch, 3)
    assert equal_states(ranks[0]["state"], ranks[1]["state"])  # the full weights, synced
    snapshots = tmp_path / "snapshots"
    assert equal_states(load_file(snapshot(snapshots, 1, 3)), ranks[0]["state"])
    assert read_record(snapshot(snapshots, 1, 3))["world_size"] == 2
    assert sorted(p.name for p in (snapshots / "epoch_001").iterdir()) == [
        "replica_003.safetensors",
        "selmerge.json",
    ]


def test_resuming_mid_epoch_with_another_batch_size_is_refused(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    job = ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    job_trainer(job, epochs=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        Net(), *loaders()
    )
    wider = DataLoader(make_data(), batch_size=2 * BATCH, shuffle=True)
    job = ReplicaJob(K, 0, seed=ORDER_SEED, snapshot_dir=tmp_path / "s")
    with pytest.raises(MisconfigurationException, match="but this fit's batch_size is 16"):
        job_trainer(job).fit(Net(), wider, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")


def test_a_killed_writes_temporaries_are_removed_by_its_jobs_next_start(tmp_path: Path) -> None:
    """Only the job that writes a name removes it: replica 0's job also its initial weights'."""
    from lightning_selmerge.ensemble.replica_snapshots import remove_stale_temporaries

    (tmp_path / "epoch_000").mkdir()
    mine = [
        tmp_path / "epoch_000" / ".replica_000.safetensors.tmp-0123abcd",
        tmp_path / ".initial.tmp-89abcdef",
    ]
    other = tmp_path / "epoch_000" / ".replica_001.safetensors.tmp-0123abcd"
    mine[1].mkdir()
    for path in (mine[0], other):
        path.write_bytes(b"partial")
    assert not remove_stale_temporaries(tmp_path, 2)
    assert sorted(remove_stale_temporaries(tmp_path, 0)) == sorted(mine)
    assert not any(p.exists() for p in mine) and other.exists()
