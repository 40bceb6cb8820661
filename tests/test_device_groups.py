"""DataOrderEnsemble across device groups (replica x shard mesh) on gloo, against one process."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from ensemble_support import Net, child_env, make_data
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_selmerge import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.ensemble.device_groups import ReplicaLayout
from lightning_selmerge.ensemble.sampler import EnsembleBatchSampler
from lightning_selmerge.merging import ParameterSelection, merge_state_dicts

TESTS = Path(__file__).parent


def run_distributed(out: Path, devices: int, k: int, shard: int, batch: int, *flags: str) -> dict:
    """Run tests/distributed_fit.py on ``devices`` gloo ranks; load what the ranks wrote."""
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(TESTS.parent, TESTS)
    env.pop("OMP_NUM_THREADS", None)  # each rank's thread count is the strategy's to set
    args = [str(out), str(devices), str(k), str(shard), str(batch), *flags]
    proc = subprocess.run(
        [sys.executable, str(TESTS / "distributed_fit.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(devices)]
    result = {"ranks": ranks, "merged": torch.load(out / "merged.pt"), "stderr": proc.stderr}
    if (out / "resumed.pt").exists():
        result["resumed"] = torch.load(out / "resumed.pt")
    return result


def full_replicas(ranks: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
    """Each replica's whole tensors, concatenated from its shard ranks' dim-0 slices."""
    parts: dict[int, list[tuple[int, dict]]] = {}
    for rank in ranks:
        for replica, state in rank["replicas"].items():
            parts.setdefault(replica, []).append((rank["shard_rank"], state))
    out = {}
    for replica, shards in parts.items():
        shards.sort(key=lambda item: item[0])
        names = shards[0][1]
        out[replica] = {n: torch.cat([s[n] for _, s in shards]) for n in names}
    return out


def sequential(k: int, batch: int) -> tuple[list[dict[str, torch.Tensor]], dict, dict]:
    """The same fit on one process: replica states, merged weights, logged metrics."""
    torch.use_deterministic_algorithms(True)
    data = make_data(64)
    callback = SelectionMergeCallback(resample=2, seed=5)
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=k, seed=3),
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[callback],
    )
    trainer.fit(
        Net(),
        torch.utils.data.DataLoader(data, batch_size=batch),
        torch.utils.data.DataLoader(data, batch_size=16),
    )
    strategy = trainer.strategy
    assert isinstance(strategy, DataOrderEnsemble) and callback.merged_state is not None
    metrics = {n: float(v) for n, v in trainer.callback_metrics.items()}
    return strategy.replica_states(), dict(callback.merged_state), metrics


def assert_bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_replica_groups_of_two_replicas_match_the_sequential_run(tmp_path: Path) -> None:
    """K=4 on 2 ranks (R=2, G=1): each rank trains 2 replicas one after another."""
    result = run_distributed(tmp_path, 2, 4, 1, 8, "--resume=3")
    ranks = result["ranks"]
    assert [sorted(r["replicas"]) for r in ranks] == [[0, 1], [2, 3]]
    # every rank computes with as many threads (a thread count changes float sums' bits)
    assert len({r["threads"] for r in ranks}) == 1
    assert ranks[0]["full_on_rank_0"] == sorted(result["merged"])
    assert ranks[1]["full_on_rank_0"] == []
    replicas = full_replicas(ranks)
    assert not torch.equal(replicas[0]["net.0.weight"], replicas[2]["net.0.weight"])
    base = Net().state_dict()
    method = ParameterSelection(resample=2)
    single = merge_state_dicts([replicas[k] for k in range(4)], base=base, method=method, seed=5)
    assert_bits_equal(result["merged"], single)

    seq_replicas, seq_merged, seq_metrics = sequential(4, 8)
    for k in range(4):  # the same replicas, bit for bit, whichever rank trained them
        assert_bits_equal(replicas[k], seq_replicas[k])
    assert_bits_equal(result["merged"], seq_merged)
    for rank in ranks:  # every rank logs every replica's metrics, not an average over replicas
        for k in range(4):
            name = f"replica_{k}/val_loss"
            assert rank["metrics"][name] == pytest.approx(seq_metrics[name], rel=1e-6)
            name = f"replica_{k}/train_loss"
            assert rank["metrics"][name] == pytest.approx(seq_metrics[name], rel=1e-6)
        assert rank["metrics"]["val_loss"] == pytest.approx(seq_metrics["val_loss"], rel=1e-6)

    # resumed from the checkpoint at step 3 (inside replica 0 of each group): the same merge
    assert_bits_equal(result["resumed"], result["merged"])
    # a rank's file in the staging directory is not another run's leftover
    assert "unfinished temporary files" not in result["stderr"]
    ckpt = tmp_path / "ckpt" / "step=3.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "checkpoint.pt",
        "rank_00000.pt",
        "rank_00001.pt",
    ]


def test_one_replica_per_device_equals_the_sequential_mode(tmp_path: Path) -> None:
    """K=2 on 2 ranks (R=2, G=1) gives the sequential mode's merged weights bit for bit."""
    result = run_distributed(tmp_path, 2, 2, 1, 8)
    _, seq_merged, _ = sequential(2, 8)
    assert_bits_equal(result["merged"], seq_merged)


def test_sharded_replicas_on_four_ranks(tmp_path: Path) -> None:
    """K=2, G=2 on 4 ranks: each replica is FSDP2-sharded over 2 ranks that see half its batches.

    The inactive replicas are offloaded to disk, one directory per rank.
    """
    flags = ("--resume=6", "--offload-disk", "--metric", "--validate")
    result = run_distributed(tmp_path, 4, 2, 2, 8, *flags)
    ranks = result["ranks"]
    assert [(sorted(r["replicas"]), r["shard_rank"]) for r in ranks] == [
        ([0], 0),
        ([0], 1),
        ([1], 0),
        ([1], 1),
    ]
    # net.0.weight is (8, 4): shard 1 starts at row 4 = flat offset 16
    assert ranks[1]["offsets"]["net.0.weight"] == 16
    assert ranks[1]["replicas"][0]["net.0.weight"].shape == (4, 4)
    # only the writing rank holds the whole merge (checkpoints, export); the others hold nothing
    assert ranks[0]["full_on_rank_0"] == sorted(result["merged"])
    assert [r["full_on_rank_0"] for r in ranks[1:]] == [[], [], []]
    replicas = full_replicas(ranks)
    assert not torch.equal(replicas[0]["net.0.weight"], replicas[1]["net.0.weight"])
    base = Net().state_dict()
    method = ParameterSelection(resample=2)
    single = merge_state_dicts([replicas[0], replicas[1]], base=base, method=method, seed=5)
    assert_bits_equal(result["merged"], single)
    # the two shard ranks of a replica train one model on batches t*2, t*2+1 of its order:
    # the same steps as one process with batches twice as big (up to float rounding)
    seq_replicas, _, _ = sequential(2, 16)
    for k in range(2):
        for name, tensor in seq_replicas[k].items():
            torch.testing.assert_close(replicas[k][name], tensor, rtol=1e-5, atol=1e-5)
    # resumed from step 6: after epoch 0's merge, inside epoch 1 (sharded optimizer states)
    assert_bits_equal(result["resumed"], result["merged"])
    offloaded = sorted(p.name for p in (tmp_path / "offload").iterdir())
    assert offloaded == [f"rank_{r:05d}" for r in range(4)]
    # each replica is validated over its two shard ranks' halves of the data, a torchmetrics
    # metric synced over those two ranks only (the other group holds the other replica), and
    # the merge over every rank: the whole validation set, as one process would see it
    merged_net = Net()
    merged_net.load_state_dict(result["merged"])
    x, y = make_data(64).tensors[1:]
    with torch.no_grad():
        losses = [merged_net.loss((None, x[i : i + 16], y[i : i + 16])) for i in range(0, 64, 16)]
    whole_set = float(torch.stack(losses).mean())
    for rank in ranks:
        metrics = rank["metrics"]
        assert metrics["val_loss"] == pytest.approx(whole_set, rel=1e-5)
        assert metrics["val_mean"] == pytest.approx(whole_set, rel=1e-5)
        for k in range(2):
            assert metrics[f"replica_{k}/val_mean"] == pytest.approx(
                metrics[f"replica_{k}/val_loss"], rel=1e-5
            )
        assert metrics["replica_0/val_loss"] != pytest.approx(metrics["replica_1/val_loss"])
        # trainer.validate after the fit: the module is still sharded, each slice the merge's
        # (the broadcast of rank 0's weights raised NotImplementedError on its DTensors)
        assert rank["validated"][0]["val_loss"] == pytest.approx(whole_set, rel=1e-5)
        # ... and the replicas stay the fit's (each rank's disk store was replaced by an empty
        # one, so replica_state(k) gave the initial weights)
        for replica, state in rank["replicas"].items():
            assert_bits_equal(rank["replicas_after"][replica], state)


def test_a_sharded_fit_resumes_from_an_epoch_end_through_the_sanity_check(tmp_path: Path) -> None:
    """K=2, G=2 on 2 ranks resumed from the checkpoint saved after epoch 0's validation: the
    resumed fit's sanity check validates the checkpoint's merge (whole tensors loaded into the
    sharded module raised a size mismatch), and the fit ends with the same merge."""
    result = run_distributed(tmp_path, 2, 2, 2, 8, "--resume-epoch-end")
    assert_bits_equal(result["resumed"], result["merged"])


def test_layout_errors_name_the_fix() -> None:
    with pytest.raises(MisconfigurationException, match="not divisible by shard_size=2"):
        ReplicaLayout.for_world(num_replicas=4, world_size=3, shard_size=2, rank=0)
    with pytest.raises(MisconfigurationException, match="multiple of 3"):
        ReplicaLayout.for_world(num_replicas=4, world_size=3, shard_size=1, rank=0)
    layout = ReplicaLayout.for_world(num_replicas=8, world_size=4, shard_size=1, rank=3)
    assert layout.local_replicas == [6, 7] and layout.replica_groups == 4


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharded_sampler_deals_batches_round_robin(drop_last: bool) -> None:
    orders = DataOrderSampler(num_samples=10, seed=1)
    per_shard = [
        EnsembleBatchSampler(orders, 2, 2, drop_last, replicas=[1], num_shards=3, shard_rank=s)
        for s in range(3)
    ]
    whole = EnsembleBatchSampler(orders, 2, 2, drop_last)
    batches = whole.replica_batches(0, 1)  # 5 batches of replica 1
    steps = 1 if drop_last else 2  # 5 batches over 3 shards: 1 full step (+ 1 padded)
    assert [s.batches_per_replica for s in per_shard] == [steps] * 3
    padded = (batches + batches)[: steps * 3]
    for shard, sampler in enumerate(per_shard):
        assert sampler.replica_batches(0, 1) == padded[shard::3]
        assert sampler.replica_of(0) == 1


def test_shard_size_must_divide_the_devices() -> None:
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=2, shard_size=2),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
    )
    data = torch.utils.data.DataLoader(make_data(), batch_size=8)
    with pytest.raises(MisconfigurationException, match="not divisible by shard_size=2"):
        trainer.fit(Net(), data)


def test_fsdp_groups_config_runs_through_the_cli(tmp_path: Path) -> None:
    """configs/fsdp_groups.yaml layered on the SFT config, on 2 gloo ranks (1 group x 2 shards)."""
    root = TESTS.parent
    data = root / "examples" / "data" / "chatterbot_pairs.jsonl"
    args = [
        "fit",
        "--config",
        str(root / "configs" / "sft_causal_lm.yaml"),
        "--config",
        str(root / "configs" / "fsdp_groups.yaml"),
        f"--data.init_args.data_files={data}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.fast_dev_run=1",
        "--trainer.logger=false",
    ]
    env = child_env(root)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_selmerge.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    exported = tmp_path / "runs" / "sft" / "merged" / "epoch_000"
    assert (exported / "config.json").exists()


def test_resuming_with_another_layout_is_refused() -> None:
    saved = {
        "num_replicas": 4,
        "seed": 0,
        "fixed_batches": False,
        "layout": {"num_replicas": 4, "replica_groups": 2, "shard_size": 2},
    }
    strategy = DataOrderEnsemble(num_replicas=4)  # one device: 1 group x shard_size 1
    with pytest.raises(MisconfigurationException, match="2 replica group\\(s\\) x shard_size=2"):
        strategy._check_compatible(saved, "step=3.ckpt")


def test_a_padded_evaluation_split_is_named() -> None:
    from lightning_selmerge.ensemble.trainer_checks import warn_padded_evaluation

    with pytest.warns(UserWarning, match="61 evaluation samples split over shard_size=2"):
        warn_padded_evaluation(torch.utils.data.DataLoader(make_data(61)), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_padded_evaluation(torch.utils.data.DataLoader(make_data(60)), 2)
        warn_padded_evaluation(torch.utils.data.DataLoader(make_data(61)), 1)
