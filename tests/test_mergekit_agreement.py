"""``benchmarks/mergekit_agreement.py`` without mergekit: one line naming the fix, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "mergekit_agreement.py"


def run(*args: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={"PATH": path, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize("args", [[], ["--mergekit-bin", "/no/such/mergekit-pytorch"]])
def test_without_mergekit_it_says_how_to_get_it(args: list[str], tmp_path: Path) -> None:
    beside = Path(sys.executable).parent / "mergekit-pytorch"
    if not args and beside.is_file():
        pytest.skip("mergekit is installed beside this Python")
    done = run(*args, path=str(tmp_path))  # an empty PATH: no mergekit-pytorch on it
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("mergekit_agreement: ")
    assert "pip install -e .[bench]" in lines[0] and "--mergekit-bin PATH" in lines[0]
