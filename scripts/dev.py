#!/usr/bin/env python3
"""Set up a virtualenv for this checkout and run the demo or the tests.

    python3 scripts/dev.py demo      # the main job: `lightning-selmerge fit --config
                                     # configs/demo.yaml`, then `lightning-selmerge report`
    python3 scripts/dev.py test      # ruff + the test suite

``demo`` passes further arguments to ``fit`` (e.g. ``--trainer.max_epochs=1``). Its logs go to a
new ``runs/demo/version_N`` (figures in ``version_N/report``); the merged model of each epoch is
exported to ``runs/demo/merged/epoch_NNN``, replaced by a rerun.

Needs only Python >= 3.10. Creates ``.venv`` in the repo (or uses ``$SELMERGE_VENV``). If that
environment has no torch, the CPU build ``torch==2.13.0`` is installed first; an existing torch is
never replaced (the package asks for ``torch>=2.6``). Re-installs only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SELMERGE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH_CPU = "torch==2.13.0"
EXTRAS = ".[dev,examples]"
DEMO_CONFIG = "configs/demo.yaml"
DEMO_RUNS = ROOT / "runs" / "demo"  # the logger's save_dir/name and the export's parent there


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
    # The CPU build: on Linux a plain `pip install torch` pulls several GB of CUDA packages, so
    # PyTorch's CPU index comes first (wheels found locally through pip's config count too); a
    # machine that cannot reach it falls back to the configured indexes, asking there on Linux
    # for the `+cpu` build by name, so that the fallback can never be PyPI's CUDA build.
    if not has_torch():
        cpu_index = ("--index-url", "https://download.pytorch.org/whl/cpu", "--timeout", "10")
        if run(*pip, TORCH_CPU, *cpu_index, "--retries", "0", check=False) != 0:
            fallback = f"{TORCH_CPU}+cpu" if sys.platform.startswith("linux") else TORCH_CPU
            if run(*pip, fallback, check=False) != 0:
                sys.exit(
                    f"could not install the CPU build of {TORCH_CPU} from "
                    "https://download.pytorch.org/whl/cpu or the configured pip indexes: install "
                    f"a torch (>= 2.6) into {VENV} yourself, e.g. `{PYTHON} -m pip install torch "
                    "--index-url https://download.pytorch.org/whl/cpu`, and rerun"
                )
    stamp = VENV / ".selmerge-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        run(*pip, "-e", EXTRAS)
        stamp.write_text(digest)


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def demo(rest: list[str]) -> int:
    """``fit --config configs/demo.yaml`` into a new version directory, then ``report`` on it."""
    versions = [
        int(m[1])
        for p in DEMO_RUNS.glob("version_*")
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    version = max(versions, default=-1) + 1
    run_dir = (DEMO_RUNS / f"version_{version}").relative_to(ROOT)  # commands run in ROOT
    cli = (PYTHON, "-m", "lightning_selmerge")
    start = time.monotonic()
    code = run(
        *cli,
        "fit",
        "--config",
        DEMO_CONFIG,
        f"--trainer.logger.init_args.version={version}",
        *rest,
        check=False,
    )
    if code != 0:
        return code
    code = run(*cli, "report", run_dir, check=False)
    if code != 0:
        return code
    exports = sorted((DEMO_RUNS / "merged").glob("epoch_*"), key=lambda p: p.stat().st_mtime)
    print(f"\ndemo done in {time.monotonic() - start:.0f} s")
    print(f"  TensorBoard logs:  {shown(ROOT / run_dir)}")
    print(f"  figures, summary:  {shown(ROOT / run_dir / 'report')}")
    if exports:
        print(f"  merged model:      {shown(exports[-1])}  (AutoModelForCausalLM.from_pretrained)")
    print(f"  open TensorBoard:  {shown(BIN / 'tensorboard')} --logdir {shown(DEMO_RUNS)}")
    print("                     then browse http://localhost:6006")
    return 0


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
        return demo(rest)
    if command == "test":
        if run(PYTHON, "-m", "ruff", "check", ".", check=False) != 0:
            return 1
        return run(PYTHON, "-m", "pytest", "-q", *rest, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
