"""PositionLossMonitor with DataOrderEnsemble on device groups (gloo ranks) vs one device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ensemble_support import child_env
from monitor_fit import run

from lightning_selmerge.data import DataOrderSampler

TESTS = Path(__file__).parent


def run_ranks(out: Path, devices: int, k: int, shard: int, batch: int, *flags: str) -> list:
    """tests/monitor_fit.py on ``devices`` gloo ranks; what every rank wrote."""
    out.mkdir(parents=True, exist_ok=True)
    args = [str(out), str(devices), str(k), str(shard), str(batch), *flags]
    proc = subprocess.run(
        [sys.executable, str(TESTS / "monitor_fit.py"), *args],
        env=child_env(TESTS.parent, TESTS),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(devices)]


def assert_same_rows(got: dict, want: dict, exact_loss: bool = True) -> None:
    for column in ("sample", "replica", "epoch", "position"):
        assert torch.equal(got[column], want[column]), column
    if exact_loss:
        assert torch.equal(got["loss"], want["loss"])
    else:
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-4, atol=1e-5)


def test_replica_groups_record_and_probe_as_one_device(tmp_path: Path) -> None:
    """K=4 on 2 ranks (2 groups of 2 replicas): every rank ends with the one-device records,
    bit for bit (losses included), and logs the same loss-by-position of every replica and the
    merge; a resume inside epoch 0 (each rank's rows of it from the checkpoint) ends the same."""
    ranks = run_ranks(tmp_path, 2, 4, 1, 8, "--resume=3")
    single = run(1, 4, 1, 8)
    orders = DataOrderSampler(num_samples=64, seed=3)
    for rank in ranks:
        for result in (rank, rank["resumed"]):
            assert_same_rows(result["records"], single["records"])
            for k in range(4):
                assert torch.equal(result["positions"][k], orders.positions(0, k))
            assert result["metrics"] == single["metrics"]
    names = {n.split("/")[1] for n in single["metrics"]}
    assert names == {"replica_0", "replica_1", "replica_2", "replica_3", "merged"}
    rows = single["records"]
    for k in range(4):  # each batch under the replica that trained it, at its own positions
        mine = (rows["replica"] == k) & (rows["epoch"] == 1)
        assert torch.equal(rows["sample"][mine], orders.order(1, k))
        assert rows["position"][mine].tolist() == list(range(64))


def test_sharded_replicas_record_positions_over_their_shard_ranks(tmp_path: Path) -> None:
    """K=2, G=2 on 2 ranks: a replica's batches alternate between its two shard ranks; the
    gathered positions are those of one device with batches twice as big."""
    ranks = run_ranks(tmp_path, 2, 2, 2, 8)
    single = run(1, 2, 1, 16)
    for rank in ranks:  # the same steps up to float rounding: losses close, not equal
        assert_same_rows(rank["records"], single["records"], exact_loss=False)
        for k in range(2):
            assert torch.equal(rank["positions"][k], single["positions"][k])
        assert rank["metrics"].keys() == single["metrics"].keys()
        for name, value in single["metrics"].items():
            assert rank["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_data_parallel_ranks_bin_every_rows_loss_every_epoch(tmp_path: Path) -> None:
    """Plain DDP, probe_size=0: each rank trains its part of every epoch; the binned training
    losses of epoch 1 cover every rank's rows (only epoch 0's were gathered: ranks logged
    different values)."""
    proc = subprocess.run(
        [sys.executable, str(TESTS / "ddp_monitor_fit.py"), str(tmp_path), "2"],
        env=child_env(TESTS.parent, TESTS),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=False) for r in range(2)]
    for epoch in (0, 1):
        assert ranks[0]["logged"][epoch] == ranks[1]["logged"][epoch], epoch
    own = [r["rows_epoch_1"]["sample"] for r in ranks]
    assert sorted(torch.cat(own).tolist()) == list(range(50))  # each rank trained half
