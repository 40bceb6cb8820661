#!/usr/bin/env python3
"""Set up a virtualenv for this checkout and run the demo or the tests.

    python3 scripts/dev.py demo      # the main job: `lightning-selmerge fit --config
                                     # configs/demo.yaml`, then `lightning-selmerge report`
    python3 scripts/dev.py test      # ruff + the test suite
    python3 scripts/dev.py test-latest   # the same against the newest versions pyproject allows
    python3 scripts/dev.py lock      # after a green test-latest: record its versions in the lock

``demo`` passes further arguments to ``fit`` (e.g. ``--trainer.max_epochs=1``). Its logs go to a
new ``runs/demo/version_N`` (figures in ``version_N/report``); the merged model of each epoch is
exported to ``runs/demo/merged/epoch_NNN``, replaced by a rerun.

Needs only Python >= 3.10. Creates ``.venv`` in the repo (or uses ``$SELMERGE_VENV``). If that
environment has no torch, the CPU build ``torch==2.13.0`` is installed first; an existing torch is
never replaced (the package asks for ``torch>=2.6``). Re-installs only when pyproject.toml or the
lock file changed.

Reproducible installs: ``demo`` and ``test`` (and so CI) install the exact versions of
``requirements/lock.txt``, the set the suite last passed with, as pip constraints; the package
itself keeps its version ranges for users. ``test-latest`` runs the suite in a second environment
(``.venv-latest``) against the newest versions the ranges allow, so drift shows before it breaks a
fresh clone; ``lock`` then writes that environment's versions to the lock file. torch is never in
the lock: it is installed as above, or kept as found.
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
LOCK = ROOT / "requirements" / "lock.txt"
# Never pinned by the lock: torch is installed (or kept) on its own, with its CUDA companions.
UNLOCKED = re.compile(
    r"^(torch|triton|nvidia-[\w-]+|lightning-selmerge|lightning_selmerge)==", re.I
)
VENV = Path(os.environ.get("SELMERGE_VENV", ROOT / ".venv"))
LATEST_VENV = ROOT / ".venv-latest"
TORCH_CPU = "torch==2.13.0"
EXTRAS = ".[dev,examples]"
DEMO_CONFIG = "configs/demo.yaml"
DEMO_RUNS = ROOT / "runs" / "demo"  # the logger's save_dir/name and the export's parent there


def run(*cmd: str | Path, check: bool = True) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, check=check).returncode


def bin_dir(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin")


def python_of(env: Path) -> Path:
    return bin_dir(env) / ("python.exe" if os.name == "nt" else "python")


def has_torch(python: Path) -> bool:
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


def lock_python() -> str | None:
    """The ``major.minor`` Python the lock file was made with (its ``# python X.Y`` line)."""
    if not LOCK.exists():
        return None
    match = re.search(r"^# python (\d+\.\d+)$", LOCK.read_text(), re.M)
    return match[1] if match else None


def env_python_version(python: Path) -> str:
    code = "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def ensure_env(env: Path = VENV, locked: bool = True) -> Path:
    """Create ``env`` if needed, install torch and the package into it; return its python.

    ``locked``: install the lock file's versions (when it was made for this Python); otherwise
    the newest versions that pyproject.toml allows.
    """
    python = python_of(env)
    if not python.exists():
        print(f"creating virtualenv {env}", flush=True)
        venv.EnvBuilder(with_pip=True).create(env)
    pip = (python, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    # The CPU build: on Linux a plain `pip install torch` pulls several GB of CUDA packages, so
    # PyTorch's CPU index comes first (wheels found locally through pip's config count too); a
    # machine that cannot reach it falls back to the configured indexes, asking there on Linux
    # for the `+cpu` build by name, so that the fallback can never be PyPI's CUDA build.
    if not has_torch(python):
        cpu_index = ("--index-url", "https://download.pytorch.org/whl/cpu", "--timeout", "10")
        if run(*pip, TORCH_CPU, *cpu_index, "--retries", "0", check=False) != 0:
            fallback = f"{TORCH_CPU}+cpu" if sys.platform.startswith("linux") else TORCH_CPU
            if run(*pip, fallback, check=False) != 0:
                sys.exit(
                    f"could not install the CPU build of {TORCH_CPU} from "
                    "https://download.pytorch.org/whl/cpu or the configured pip indexes: install "
                    f"a torch (>= 2.6) into {env} yourself, e.g. `{python} -m pip install torch "
                    "--index-url https://download.pytorch.org/whl/cpu`, and rerun"
                )
    constraints: tuple[str | Path, ...] = ()
    if locked and LOCK.exists():
        made_for, have = lock_python(), env_python_version(python)
        if made_for == have:
            constraints = ("-c", LOCK)
        else:
            print(
                f"note: {LOCK.relative_to(ROOT)} was made with Python {made_for}, this is "
                f"Python {have}: installing the newest versions pyproject.toml allows",
                flush=True,
            )
    upgrade = () if locked else ("--upgrade", "--upgrade-strategy", "eager")
    stamp = env / ".selmerge-installed"
    inputs = (ROOT / "pyproject.toml").read_bytes() + b"".join(
        Path(c).read_bytes() for c in constraints[1:]
    )
    digest = hashlib.sha256(inputs).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        run(*pip, *upgrade, *constraints, "-e", EXTRAS)
        stamp.write_text(digest)
    return python


def write_lock(python: Path) -> int:
    """Write ``python``'s environment (less torch and this package) to the lock file."""
    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    pins = sorted(
        (line for line in frozen if "==" in line and not UNLOCKED.match(line)), key=str.lower
    )
    torch = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    header = [
        "# Versions the test suite last passed with: pip constraints for scripts/dev.py (and CI).",
        "# Regenerate: `python3 scripts/dev.py test-latest`, then, when green,",
        "# `python3 scripts/dev.py lock`. torch is not pinned here (tested with " + torch + ").",
        f"# python {env_python_version(python)}",
    ]
    LOCK.parent.mkdir(exist_ok=True)
    staging = LOCK.with_suffix(".tmp")
    staging.write_text("\n".join([*header, *pins]) + "\n")
    staging.replace(LOCK)
    print(f"wrote {len(pins)} pins to {LOCK.relative_to(ROOT)}")
    return 0


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def demo(python: Path, rest: list[str]) -> int:
    """``fit --config configs/demo.yaml`` into a new version directory, then ``report`` on it."""
    versions = [
        int(m[1])
        for p in DEMO_RUNS.glob("version_*")
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    version = max(versions, default=-1) + 1
    run_dir = (DEMO_RUNS / f"version_{version}").relative_to(ROOT)  # commands run in ROOT
    cli = (python, "-m", "lightning_selmerge")
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
    tensorboard = bin_dir(python.parent.parent) / "tensorboard"
    print(f"  open TensorBoard:  {shown(tensorboard)} --logdir {shown(DEMO_RUNS)}")
    print("                     then browse http://localhost:6006")
    return 0


def main(argv: list[str]) -> int:
    commands = {"demo", "test", "test-latest", "lock", "setup"}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    latest = command in {"test-latest", "lock"}
    env = LATEST_VENV if latest else VENV
    if command == "lock" and not python_of(env).exists():
        print(f"no {env.name}: run `python3 scripts/dev.py test-latest` first", file=sys.stderr)
        return 2
    python = python_of(env) if command == "lock" else ensure_env(env, locked=not latest)
    os.environ.update(
        {
            "PATH": f"{bin_dir(env)}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
        }
    )
    if command == "demo":
        return demo(python, rest)
    if command == "lock":
        return write_lock(python)
    if command in {"test", "test-latest"}:
        if run(python, "-m", "ruff", "check", ".", check=False) != 0:
            return 1
        return run(python, "-m", "pytest", "-q", *rest, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
