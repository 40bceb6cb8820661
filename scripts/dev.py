#!/usr/bin/env python3
"""Set up a virtualenv for this checkout and run the demo or the tests.

    python3 scripts/dev.py demo      # the main job: a small ensemble fine-tune + merge on CPU
    python3 scripts/dev.py test      # ruff + the test suite

Needs only Python >= 3.10. Creates ``.venv`` in the repo (or uses ``$SELMERGE_VENV``). If that
environment has no torch, the CPU build ``torch==2.13.0`` is installed first; an existing torch is
never replaced (the package asks for ``torch>=2.4``). Re-installs only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SELMERGE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH_CPU = "torch==2.13.0"
EXTRAS = ".[dev,examples]"


def run(*cmd: str | Path, check: bool = True) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, check=check).returncode


def has_torch() -> bool:
    probe = subprocess.run([str(PYTHON), "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


def ensure_env() -> None:
    if not PYTHON.exists():
        print(f"creating virtualenv {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = (PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    # The CPU build: a plain `pip install torch` would pull several GB of CUDA packages.
    if not has_torch() and run(*pip, TORCH_CPU, check=False) != 0:
        run(*pip, "torch", "--index-url", "https://download.pytorch.org/whl/cpu")
    stamp = VENV / ".selmerge-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        run(*pip, "-e", EXTRAS)
        stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_env()
    env_bin = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env_bin)
    if command == "demo":
        return run(PYTHON, "examples/demo.py", *rest, check=False)
    if command == "test":
        if run(PYTHON, "-m", "ruff", "check", ".", check=False) != 0:
            return 1
        return run(PYTHON, "-m", "pytest", "-q", *rest, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
