"""Crash safety of the sequential ensemble: SIGKILL at several points, resume, compare bit for bit.

``fault_injection_worker.py`` runs an uninterrupted reference fit and, per scenario, a fit that
SIGKILLs itself at the scenario's point, then resumes it in a new process from ``last.ckpt``
(see its docstring for the fit). The resumed run must end with the reference's merged weights
and replica states, bit for bit, and no kill may leave a checkpoint file that does not load.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ensemble_support import child_env

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

#: scenario -> the global step of the last checkpoint the kill leaves (24 steps an epoch)
SCENARIOS = {
    "mid_replica": 36,  # killed between backward and optimizer step of epoch 1, batch 12
    "replica_boundary": 40,  # killed half-way through loading replica 2 (disk offload)
    "epoch_boundary": 24,  # killed at the start of epoch 1, after epoch 0's merge and validation
    "merge": 47,  # killed inside epoch 1's merge, after 2 of its 4 tensors
    "checkpoint_write": 29,  # killed with half of step 30's last.ckpt written
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fault_injection")
    env = child_env(ROOT, TESTS)
    worker = TESTS / "fault_injection_worker.py"
    proc = subprocess.run(
        [sys.executable, str(worker), str(out), "reference", *SCENARIOS],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((out / "reference" / "result.json").read_text()) == {"run": {"exit_code": 0}}
    return out


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        same = torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8))
        assert same, f"{name}: max |diff| {(got[name] - want[name]).abs().max().item():.3g}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_killed_fit_resumes_bit_identical(runs: Path, scenario: str) -> None:
    out = runs / scenario
    result = read(out / "result.json")
    assert result["killed"] == {"signal": int(signal.SIGKILL)}
    assert read(out / "killed.json")["point"] == scenario  # it died where it was meant to
    assert result["resumed"] == {"exit_code": 0}, "the resumed fit failed; see its stderr"

    after_kill = read(out / "after_kill.json")
    broken = {name: info for name, info in after_kill.items() if "error" in info}
    assert not broken, f"the kill left checkpoints that do not load: {broken}"
    assert after_kill["last.ckpt"]["global_step"] == SCENARIOS[scenario]

    want = torch.load(runs / "reference" / "final.pt", weights_only=False)
    got = torch.load(out / "final.pt", weights_only=False)
    assert got["global_step"] == want["global_step"] == 72
    assert_same(got["module"], want["module"])  # the final merge
    for got_replica, want_replica in zip(got["replicas"], want["replicas"], strict=True):
        assert_same(got_replica, want_replica)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(runs: Path) -> None:
    out = runs / "checkpoint_write"
    note = read(out / "killed.json")
    after_kill = read(out / "after_kill.json")
    # last.ckpt is still the complete step-29 file it was before the write began
    assert note["previous_step"] == after_kill["last.ckpt"]["global_step"] == 29
    assert after_kill["last.ckpt"]["sha256"] == note["previous_sha256"]
    # the half-written bytes went to a temporary file, which the kill left behind
    assert 0 < note["written"] < note["size"]
    assert note["temp_size_after_kill"] == note["written"]
    # and step 30's own checkpoint, written just before, is complete
    assert after_kill["epoch=1-step=30.ckpt"]["global_step"] == 30
