"""Agreement of our task arithmetic and TIES with mergekit's on the same safetensors files.

Builds a base and K fine-tuned replicas (small decoder-shaped tensors, float32 and bfloat16 files),
merges them with ``mergekit-pytorch`` (``task_arithmetic`` and ``ties``, several parameter sets)
and with ``merge_checkpoints`` (:class:`TaskArithmetic`, :class:`TiesMerging`), and prints per
case whether every tensor is bit-identical, and the largest absolute difference. For bfloat16
files mergekit is run twice: as is (it computes in bfloat16) and with ``dtype: float32`` and
``out_dtype: bfloat16`` (it computes in float32, as we do, and writes bfloat16). Run from the
repository root::

    python benchmarks/mergekit_agreement.py [--mergekit-bin PATH] [--k 3] [--json out.json]

It needs mergekit (``pip install -e .[bench]``): ``--mergekit-bin``, else the
``mergekit-pytorch`` beside this Python, else the one on ``PATH``; without one it exits with a
line saying so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_selmerge.merging import TaskArithmetic, TiesMerging, merge_checkpoints

SHAPES = {
    "model.embed_tokens.weight": (512, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (176, 64),
    "model.layers.0.input_layernorm.weight": (64,),
    "lm_head.weight": (512, 64),
}

CASES = [
    ("task_arithmetic", {}, [1.0, 1.0, 1.0], {}),
    ("task_arithmetic", {"lambda": 0.3}, [1.0, -0.5, 2.0], {}),
    ("ties", {}, [1.0, 1.0, 1.0], {"density": 0.3}),
    ("ties", {"lambda": 0.7}, [1.0, 2.0, 0.5], {"density": 0.5}),
]


def ours(name: str, shared: dict, weights: list[float], each: dict):
    scale = shared.get("lambda", 1.0)
    if name == "task_arithmetic":
        return TaskArithmetic(weights=weights, scale=scale)
    return TiesMerging(density=each["density"], weights=weights, scale=scale)


def make_files(root: Path, k: int, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    save_file({n: t.to(dtype) for n, t in base.items()}, root / "base.safetensors")
    replicas = []
    for r in range(k):
        tensors = {
            n: (t + 0.02 * torch.randn(t.shape, generator=gen)).to(dtype) for n, t in base.items()
        }
        replicas.append(root / f"r{r}.safetensors")
        save_file(tensors, replicas[-1])
    return root / "base.safetensors", replicas


INSTALL = "install mergekit (pip install -e .[bench]) or pass --mergekit-bin PATH"


def find_mergekit(explicit: str | None) -> str:
    """The ``mergekit-pytorch`` to run (see the module's docstring); exits with one line when
    there is none."""
    if explicit is not None:
        if shutil.which(explicit) is None:
            sys.exit(
                f"mergekit_agreement: --mergekit-bin {explicit} is not an executable: {INSTALL}"
            )
        return explicit
    beside = Path(sys.executable).parent / "mergekit-pytorch"
    found = str(beside) if beside.is_file() else shutil.which("mergekit-pytorch")
    if found is None:
        sys.exit(
            "mergekit_agreement: mergekit-pytorch is neither beside this Python nor on PATH: "
            + INSTALL
        )
    return found


def run_mergekit(bin_: str, root: Path, base: Path, replicas: list[Path], case, compute) -> Path:
    name, shared, weights, each = case
    models = [
        {"model": str(p), "parameters": {"weight": w, **each}} for p, w in zip(replicas, weights)
    ]
    config = {"merge_method": name, "base_model": str(base), "models": models}
    if shared:
        config["parameters"] = shared
    if compute is not None:  # compute in float32, write the files' dtype
        config["dtype"] = compute
        config["out_dtype"] = str(replicas_dtype(replicas[0])).split(".")[-1]
    out = Path(tempfile.mkdtemp(dir=root))
    shutil.rmtree(out)
    (root / "config.yml").write_text(json.dumps(config))
    subprocess.run(
        [bin_, str(root / "config.yml"), str(out), "--quiet", "--no-copy-tokenizer"],
        check=True,
        capture_output=True,
    )
    return out


def replicas_dtype(path: Path) -> torch.dtype:
    return next(iter(load_file(path).values())).dtype


def compare(a: Path, b: Path) -> tuple[bool, float]:
    x = {n: t for f in sorted(a.glob("*.safetensors")) for n, t in load_file(f).items()}
    y = {n: t for f in sorted(b.glob("*.safetensors")) for n, t in load_file(f).items()}
    assert set(x) == set(y), (sorted(x), sorted(y))
    identical = all(x[n].dtype == y[n].dtype and torch.equal(x[n], y[n]) for n in x)
    diff = max(float((x[n].double() - y[n].double()).abs().max()) for n in x)
    differ = sum(int((x[n] != y[n]).sum()) for n in x) / sum(x[n].numel() for n in x)
    return identical, diff, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mergekit-bin",
        default=None,
        help="mergekit's mergekit-pytorch (default: the one beside this Python, else on PATH)",
    )
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    mergekit = find_mergekit(args.mergekit_bin)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, computes in ((torch.float32, [None]), (torch.bfloat16, [None, "float32"])):
            root = Path(tmp) / str(dtype).split(".")[-1]
            root.mkdir()
            base, replicas = make_files(root, args.k, dtype)
            for case in CASES:
                method = ours(*case)
                mine = merge_checkpoints(
                    replicas, root / "ours", method=method, base=base, overwrite=True
                )
                for compute in computes:
                    theirs = run_mergekit(mergekit, root, base, replicas, case, compute)
                    identical, diff, differ = compare(mine, theirs)
                    row = {
                        "files": str(dtype).split(".")[-1],
                        "mergekit_dtype": compute or "as the files",
                        "mergekit": f"{case[0]} {case[1] or ''} weights={case[2]} {case[3] or ''}",
                        "ours": repr(method),
                        "bit_identical": identical,
                        "max_abs_diff": diff,
                        "elements_differing": differ,
                    }
                    rows.append(row)
                    print(
                        f"{row['files']:>9} (mergekit computes in {row['mergekit_dtype']:>12}) "
                        f"{row['mergekit']:<60} identical={identical!s:<5} max|diff|={diff:.3g} "
                        f"differing={differ:.2%}"
                    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
