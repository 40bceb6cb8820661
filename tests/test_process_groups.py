"""Process groups released at exit (lightning_selmerge.ensemble.process_groups), on gloo ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ensemble_support import child_env

TESTS = Path(__file__).parent


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_release_frees_every_group_and_joins_gloo_threads(tmp_path: Path) -> None:
    """The mesh keeps its groups alive past ``destroy_process_group`` unless released; after
    ``release_process_groups`` none is left and no gloo worker thread runs, on every rank."""
    world = 2
    env = child_env(TESTS.parent, TESTS)
    worker = str(TESTS / "process_group_exit_worker.py")
    init = str(tmp_path / "init")
    ranks = [
        subprocess.Popen(
            [sys.executable, worker, init, str(rank), str(world)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    for proc in ranks:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        assert out.strip().startswith("released")
