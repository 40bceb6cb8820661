"""Speed and memory of the out-of-core merge (``merge_checkpoints``) on synthetic bf16 checkpoints.

What it measures:

* Builds K synthetic bf16 replica checkpoints (default 4) plus their base, each one
  ``.safetensors`` file shaped like a small decoder-only transformer (embedding and untied LM
  head, per layer q/k/v/o projections with q/k/v biases, gate/up/down MLP and two RMS norms).
  ``--total-gb`` is the summed size of the K replica files. A replica is the base plus noise,
  with ``--unchanged`` of its elements (independently per replica) left bit-identical to the
  base, as bf16 fine-tuning leaves many elements unmoved; every other element differs from the
  base. The data is reproducible (``--seed``) and is generated one file at a time.
* Warms the page cache (reads every input once) so that every method sees the same cache state,
  then runs each method ``--repeats`` times, round-robin, each run in its own subprocess so that
  peak RSS (``ru_maxrss`` of that child, via ``os.wait4``) is per method. Linux carries a
  process's ``ru_maxrss`` over fork and exec, so this parent never imports torch or holds tensors
  (generating the data and comparing outputs run in helper children too); "start-up MB" is the
  child's RSS once its imports are done. The methods:

  - ``average``: ``merge_checkpoints(..., method=WeightedAverage())``;
  - ``selection``: ``ParameterSelection()``;
  - ``selection+resample(4)``: ``ParameterSelection(resample=4)`` with the base;
  - ``mergekit linear``: ``mergekit-pytorch`` with ``merge_method: linear`` and weight 1.0 per
    replica, when mergekit is found (``--mergekit-bin``, else ``mergekit-pytorch`` next to this
    interpreter or on ``PATH``);
  - ``read floor``: a memory-bandwidth floor, reading the K inputs once through memory maps into
    a float32 accumulator (``acc.copy_(r0); acc.add_(r_k)``, 1M-element chunks), writing nothing.

  "merge s" is the time inside the child from just before the merge call to its return (imports
  and interpreter start-up excluded), plus the time of an ``os.sync()`` the parent runs right
  after the child exits, so every method is charged for getting its output to disk whether or
  not it fsyncs itself (``--no-flush`` leaves the sync out). "process s" is the whole child's
  wall time (start-up and imports included; mergekit imports transformers, which takes seconds).
  Each column reports the best of the repeats. GB/s is the input bytes the method reads (the K
  replicas, plus the base for resample) per merge second. Ratios use merge seconds: the best
  run of one method over the best of the other, and the median over rounds of the ratio within
  a round (the methods run round-robin, so a round's runs share the machine's state).
* Checks that our average is bit-identical to mergekit's linear output (``torch.equal`` on every
  tensor, same names); on any mismatch it says so loudly and exits with status 1.

Our merge runs under this interpreter (``sys.executable``) with ``PYTHONPATH`` set to the
repository root; mergekit under the interpreter of its console script. Run from the repository
root, e.g.::

    python benchmarks/merge_bench.py --mergekit-bin /path/to/venv/bin/mergekit-pytorch
    python benchmarks/merge_bench.py --total-gb 0.1 --repeats 1 --json /tmp/merge_bench.json

The default size (1.5 GB of replicas) needs about 4 GB of disk and a few minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
MB = 2**20
CHUNK_NUMEL = 1 << 20

AVERAGE = "average"
SELECTION = "selection"
RESAMPLE = "selection+resample(4)"
MERGEKIT = "mergekit linear"
FLOOR = "read floor"
STREAMING = {  # the streaming merge (one replica open at a time) of the same method
    "streaming average": AVERAGE,
    "streaming selection": SELECTION,
    "streaming resample(4)": RESAMPLE,
}
TORCH_KERNELS = {  # with --kernels both: the same merge on the torch kernels (the reference)
    "average [torch]": AVERAGE,
    "selection [torch]": SELECTION,
    "resample(4) [torch]": RESAMPLE,
}


# --------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class ModelShape:
    """A small decoder-only transformer: sizes from which the tensor list follows."""

    hidden: int
    layers: int
    vocab: int
    ffn: int
    kv: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        d = self.hidden
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, d))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (d, d)),
                (p + "self_attn.q_proj.bias", (d,)),
                (p + "self_attn.k_proj.weight", (self.kv, d)),
                (p + "self_attn.k_proj.bias", (self.kv,)),
                (p + "self_attn.v_proj.weight", (self.kv, d)),
                (p + "self_attn.v_proj.bias", (self.kv,)),
                (p + "self_attn.o_proj.weight", (d, d)),
                (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (self.ffn, d)),
                (p + "mlp.up_proj.weight", (self.ffn, d)),
                (p + "mlp.down_proj.weight", (d, self.ffn)),
            ]
        out += [("model.norm.weight", (d,)), ("lm_head.weight", (self.vocab, d))]
        return out

    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _shape_for(hidden: int, layers: int | None, target_numel: float) -> ModelShape:
    vocab, ffn, kv = 16 * hidden, _round_to(8 * hidden / 3, 64), max(64, hidden // 4)
    if layers is None:
        fixed = ModelShape(hidden, 0, vocab, ffn, kv).numel()
        per_layer = ModelShape(hidden, 1, vocab, ffn, kv).numel() - fixed
        layers = max(1, round((target_numel - fixed) / per_layer))
    return ModelShape(hidden, layers, vocab, ffn, kv)


def choose_shape(total_gb: float, k: int, hidden: int | None, layers: int | None) -> ModelShape:
    """Hidden size (a multiple of 64) and layer count whose replicas sum to about ``total_gb``."""
    target = total_gb * GB / k / 2  # bf16 elements per replica
    if hidden is None:
        # embed + head = 32 d^2, a layer about 10.5 d^2: with 8 layers about 116 d^2.
        hidden = _round_to(math.sqrt(target / 116), 64)
    return _shape_for(hidden, layers, target)


def _generator(seed: int, *parts: object) -> Any:
    import torch

    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _base_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    import torch

    gen = _generator(seed, "base", name)
    values = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        values = values.mul_(0.05).add_(1.0)
    else:
        values = values.mul_(0.01 if name.endswith("bias") else 0.02)
    return values.to(torch.bfloat16)


def _replica_tensor(name: str, base: Any, k: int, unchanged: float, seed: int) -> Any:
    """Base plus noise; ``unchanged`` of the elements keep the base bits, all others differ."""
    import torch

    gen = _generator(seed, "replica", k, name)
    noise = torch.randn(base.shape, generator=gen).mul_(2e-3)
    moved = base.float().add_(noise).to(torch.bfloat16)
    del noise
    keep = torch.rand(base.shape, generator=gen) < unchanged
    base_bits, bits = base.view(torch.int16), moved.view(torch.int16)
    # Elements meant to move but rounded back to the base value: nudge them by one ulp.
    bits.add_((bits == base_bits) & ~keep)
    torch.where(keep, base_bits, bits, out=bits)
    return moved


@dataclass
class Inputs:
    """The synthetic checkpoints on disk."""

    replicas: list[Path]
    base: Path
    shape: ModelShape
    replica_bytes: int  # the K replica files together
    base_bytes: int
    num_tensors: int


def generate_files(spec: dict[str, Any]) -> float:
    """Write the base and the replicas (runs in a child, so the parent never holds tensors);
    return the fraction of replica 0's elements bit-equal to the base."""
    import torch
    from safetensors.torch import save_file

    shape, seed, unchanged = ModelShape(**spec["shape"]), spec["seed"], spec["unchanged"]
    names = shape.tensors()
    base = {name: _base_tensor(name, dims, seed) for name, dims in names}
    save_file(base, spec["base"], metadata={"format": "pt"})
    same = total = 0
    for i, path in enumerate(spec["replicas"]):
        replica = {name: _replica_tensor(name, base[name], i, unchanged, seed) for name, _ in names}
        if i == 0:
            for name, tensor in replica.items():
                same += int(
                    (
                        tensor.view(-1).view(torch.int16) == base[name].view(-1).view(torch.int16)
                    ).sum()
                )
                total += tensor.numel()
        save_file(replica, path, metadata={"format": "pt"})
        del replica
    return same / total


def make_inputs(workdir: Path, shape: ModelShape, k: int, unchanged: float, seed: int) -> Inputs:
    """Write (or reuse, when the spec matches) ``base.safetensors`` and ``r{k}.safetensors``."""
    data = workdir / "inputs"
    spec = {"shape": asdict(shape), "k": k, "unchanged": unchanged, "seed": seed, "version": 1}
    spec_file = data / "spec.json"
    base_path = data / "base.safetensors"
    replica_paths = [data / f"r{i}.safetensors" for i in range(k)]
    reuse = (
        spec_file.is_file()
        and json.loads(spec_file.read_text()) == spec
        and all(p.is_file() for p in [base_path, *replica_paths])
    )
    if not reuse:
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        started = time.perf_counter()
        task = {
            **spec,
            "task": "generate",
            "base": str(base_path),
            "replicas": [str(p) for p in replica_paths],
        }
        measured = run_helper(task, workdir)["unchanged"]
        spec_file.write_text(json.dumps(spec) + "\n")
        print(
            f"generated inputs in {time.perf_counter() - started:.1f} s "
            f"({measured:.2%} of replica 0 equal to the base)",
            flush=True,
        )
    else:
        print(f"reusing inputs in {data}", flush=True)
    return Inputs(
        replicas=replica_paths,
        base=base_path,
        shape=shape,
        replica_bytes=sum(p.stat().st_size for p in replica_paths),
        base_bytes=base_path.stat().st_size,
        num_tensors=len(shape.tensors()),
    )


def warm_page_cache(paths: list[Path]) -> float:
    """Read every file once; return the seconds it took."""
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(16 * MB):
                pass
    return time.perf_counter() - started


# --------------------------------------------------------------------------- child processes


def _proc_status_kb(field_name: str) -> int:
    """``VmRSS`` or ``VmHWM`` (this mm only: unlike ``ru_maxrss``, not inherited over exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def child_main(spec_path: str) -> None:
    """Run one task described by a JSON spec (a merge of ours, the read floor, generating the
    inputs or comparing two outputs); write a JSON result."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["task"] == "generate":
        unchanged = generate_files(spec)
        Path(spec["result"]).write_text(json.dumps({"unchanged": unchanged}))
        return
    if spec["task"] == "compare":
        problems = compare_outputs(Path(spec["ours"]), Path(spec["theirs"]))
        Path(spec["result"]).write_text(json.dumps({"problems": problems}))
        return
    started = time.perf_counter()
    import torch

    from lightning_selmerge.merging import (
        ParameterSelection,
        WeightedAverage,
        merge_checkpoints,
        merge_state_dicts,
    )
    from lightning_selmerge.merging.safetensors_io import CheckpointReader
    from lightning_selmerge.merging.streaming import merge_state_dicts_streaming
    from lightning_selmerge.merging.streaming_files import merge_checkpoints_streaming

    imported = time.perf_counter()
    rss_after_import = _proc_status_kb("VmRSS")
    task = spec["task"]
    if task == FLOOR:
        began = time.perf_counter()
        readers = [CheckpointReader(p) for p in spec["replicas"]]
        acc = torch.empty(CHUNK_NUMEL, dtype=torch.float32)
        checksum = 0.0
        for name in readers[0].names():
            flat = [r.tensor(name).reshape(-1) for r in readers]
            for begin in range(0, flat[0].numel(), CHUNK_NUMEL):
                end = min(begin + CHUNK_NUMEL, flat[0].numel())
                part = acc[: end - begin]
                part.copy_(flat[0][begin:end])
                for other in flat[1:]:
                    part.add_(other[begin:end])
            checksum += float(acc[0])
            del flat
            for reader in readers:
                reader.release(name)
        for reader in readers:
            reader.close()
        merge_s = time.perf_counter() - began
    else:
        method = {
            AVERAGE: WeightedAverage(),
            SELECTION: ParameterSelection(),
            RESAMPLE: ParameterSelection(resample=4),
        }[STREAMING.get(task, TORCH_KERNELS.get(task, task))]
        merge = merge_checkpoints_streaming if task in STREAMING else merge_checkpoints
        # A long-lived process loads the fused kernels once (numba's cache, its thread pool):
        # that one-time cost counts with the imports, not with the merge.
        tiny = [{"w": torch.zeros(8, dtype=torch.bfloat16)} for _ in range(2)]
        warm_up = merge_state_dicts_streaming if task in STREAMING else merge_state_dicts
        warm_up(tiny, method=method, base=tiny[0] if method.needs_base else None)
        imported = time.perf_counter()
        began = time.perf_counter()
        merge(
            spec["replicas"],
            spec["out"],
            method=method,
            base=spec["base"] if method.needs_base else None,
            seed=0,
        )
        merge_s = time.perf_counter() - began
    result = {
        "import_s": imported - started,
        "merge_s": merge_s,
        "rss_after_import_kb": rss_after_import,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "hwm_kb": _proc_status_kb("VmHWM"),
    }
    Path(spec["result"]).write_text(json.dumps(result))


# Runs mergekit's console-script entry point in-process, to time the merge apart from imports.
MERGEKIT_WRAPPER = r"""
import importlib, json, re, resource, sys, time
def status(key):
    with open("/proc/self/status") as lines:
        return next((int(l.split()[1]) for l in lines if l.startswith(key + ":")), 0)
started = time.perf_counter()
script, result = sys.argv[1], sys.argv[2]
found = re.search(r"^from (\S+) import (\w+)", open(script).read(), re.M)
main = getattr(importlib.import_module(found.group(1)), found.group(2))
imported = time.perf_counter()
rss_after_import = status("VmRSS")
sys.argv = [script, *sys.argv[3:]]
code = 0
try:
    main()
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
finished = time.perf_counter()
with open(result, "w") as handle:
    json.dump({"import_s": imported - started, "merge_s": finished - imported,
               "rss_after_import_kb": rss_after_import, "hwm_kb": status("VmHWM"),
               "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, handle)
sys.exit(code)
"""


def _python_entry_point(script: Path) -> str | None:
    """The interpreter of a pip console script whose body imports ``main`` from a module."""
    try:
        text = script.read_text(errors="replace")
    except OSError:
        return None
    first = text.splitlines()[0] if text else ""
    if not first.startswith("#!") or "python" not in first:
        return None
    if not re.search(r"^from \S+ import \w+", text, re.M):
        return None
    interpreter = first[2:].strip().split()[0]
    return interpreter if Path(interpreter).exists() else None


def find_mergekit(explicit: str | None) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            sys.exit(f"--mergekit-bin {explicit} does not exist")
        return path
    beside = Path(sys.executable).parent / "mergekit-pytorch"
    if beside.is_file():
        return beside
    found = shutil.which("mergekit-pytorch")
    return Path(found) if found else None


@dataclass
class Run:
    wall_s: float  # the whole child process
    merge_s: float  # the merge call inside the child (+ flush)
    flush_s: float
    import_s: float | None
    maxrss_kb: int
    rss_after_import_kb: int | None = None  # the child's VmRSS once imports are done
    hwm_kb: int | None = None  # the child's VmHWM at the end (cross-check of maxrss_kb)


@dataclass
class MethodResult:
    name: str
    input_bytes: int
    runs: list[Run] = field(default_factory=list)

    @property
    def best_merge_s(self) -> float:
        return min(r.merge_s for r in self.runs)

    @property
    def best_wall_s(self) -> float:
        return min(r.wall_s for r in self.runs)

    @property
    def peak_rss_kb(self) -> int:
        return max(r.maxrss_kb for r in self.runs)


def run_child(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int, int]:
    """Run ``cmd``; return (wall seconds, exit code, this child's ru_maxrss in KiB)."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, proc.returncode, usage.ru_maxrss


class ChildFailed(RuntimeError):
    pass


def _our_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _our_child(spec: dict[str, Any], workdir: Path) -> tuple[list[str], Path]:
    """The command running ``spec`` in a child of this script, and the child's result file."""
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    result = out / "result.json"
    result.unlink(missing_ok=True)
    spec_path = out / "child.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    return [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)], result


def run_helper(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run an untimed child task (generate, compare); return its JSON result."""
    cmd, result = _our_child(spec, workdir)
    log = workdir / "out" / f"{spec['task']}.log"
    _, code, _ = run_child(cmd, _our_env(), log)
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise ChildFailed(f"{spec['task']} failed with exit code {code}; log {log}:\n{tail}")
    return json.loads(result.read_text())


def run_method(
    task: str,
    inputs: Inputs,
    workdir: Path,
    repeat: int,
    flush: bool,
    mergekit_bin: Path | None,
    kernels: str = "auto",
) -> tuple[Run, Path | None]:
    """One timed run of one method; return the run and its output directory."""
    out = workdir / "out" / f"{re.sub(r'[^a-z0-9]+', '-', task)}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = workdir / "out" / f"{out.name}.r{repeat}.log"
    if task == MERGEKIT:
        assert mergekit_bin is not None
        env = dict(os.environ)
        result = workdir / "out" / "result.json"
        result.unlink(missing_ok=True)
        config = workdir / "out" / "mergekit.yml"
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in inputs.replicas]
        # JSON is YAML: no yaml package needed here.
        config.write_text(json.dumps({"merge_method": "linear", "models": models}, indent=1))
        args = [str(config), str(out), "--quiet", "--no-copy-tokenizer"]
        interpreter = _python_entry_point(mergekit_bin)
        if interpreter is not None:
            cmd = [interpreter, "-c", MERGEKIT_WRAPPER, str(mergekit_bin), str(result), *args]
        else:
            cmd = [str(mergekit_bin), *args]
    else:
        env = _our_env()
        if task in TORCH_KERNELS:
            env["SELMERGE_KERNELS"] = "torch"
        elif kernels != "auto":
            env["SELMERGE_KERNELS"] = "fused" if kernels == "both" else kernels
        spec = {
            "task": task,
            "replicas": [str(p) for p in inputs.replicas],
            "base": str(inputs.base),
            "out": str(out),
        }
        cmd, result = _our_child(spec, workdir)
    os.sync()  # nothing dirty from earlier runs may be flushed during this one
    wall, code, maxrss = run_child(cmd, env, log)
    flush_s = 0.0
    if flush:
        started = time.perf_counter()
        os.sync()
        flush_s = time.perf_counter() - started
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise ChildFailed(f"{task} failed with exit code {code}; log {log}:\n{tail}")
    inner = json.loads(result.read_text()) if result.is_file() else None
    run = Run(
        wall_s=wall,
        merge_s=(inner["merge_s"] if inner else wall) + flush_s,
        flush_s=flush_s,
        import_s=inner["import_s"] if inner else None,
        maxrss_kb=maxrss,
        rss_after_import_kb=inner.get("rss_after_import_kb") if inner else None,
        hwm_kb=inner.get("hwm_kb") if inner else None,
    )
    return run, (out if task != FLOOR else None)


# --------------------------------------------------------------------------- checks and report


def _load_dir(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    for file in files:
        tensors.update(load_file(file))
    return tensors


def compare_outputs(ours: Path, theirs: Path) -> list[str]:
    """Every difference between two merged checkpoints (names, dtypes, shapes, bits)."""
    import torch

    a, b = _load_dir(ours), _load_dir(theirs)
    problems = []
    if set(a) != set(b):
        problems.append(
            f"tensor names differ: only ours {sorted(set(a) - set(b))[:5]}, "
            f"only mergekit {sorted(set(b) - set(a))[:5]}"
        )
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(
                f"{name}: ours {x.dtype} {tuple(x.shape)}, mergekit {y.dtype} {tuple(y.shape)}"
            )
        elif not torch.equal(x, y):
            differ = int((x.view(torch.int16) != y.view(torch.int16)).sum())
            worst = float((x.float() - y.float()).abs().max())
            problems.append(
                f"{name}: {differ} of {x.numel()} elements differ (max abs diff {worst:.3g})"
            )
    return problems


def _round_median(numerator: MethodResult, denominator: MethodResult) -> float:
    """Median over rounds of the two methods' merge-second ratio. The methods run round-robin,
    so the runs of one round share the machine's state (on a shared VM the best-of ratio can
    pair a quiet-moment run with a noisy-moment one)."""
    pairs = zip(numerator.runs, denominator.runs)
    return statistics.median(a.merge_s / b.merge_s for a, b in pairs)


def report(
    results: dict[str, MethodResult], inputs: Inputs, identical: bool | None
) -> tuple[str, dict[str, Any]]:
    average = results[AVERAGE].best_merge_s
    header = (
        f"{'method':<24} {'merge s':>8} {'process s':>10} {'GB/s':>6} {'vs avg':>7} "
        f"{'peak RSS MB':>12} {'RSS % in':>9} {'start-up MB':>12}"
    )
    lines = [header, "-" * len(header)]
    rows = {}
    for name, res in results.items():
        seconds = res.best_merge_s
        rss_mb = res.peak_rss_kb * 1024 / MB
        startup = [r.rss_after_import_kb for r in res.runs if r.rss_after_import_kb]
        startup_mb = max(startup) * 1024 / MB if startup else None
        row = {
            "best_merge_s": seconds,
            "best_process_s": res.best_wall_s,
            "input_bytes": res.input_bytes,
            "gb_per_s": res.input_bytes / GB / seconds,
            "ratio_to_average": seconds / average,
            "peak_rss_mb": rss_mb,
            "rss_pct_of_inputs": 100 * res.peak_rss_kb * 1024 / inputs.replica_bytes,
            "startup_rss_mb": startup_mb,
            "runs": [asdict(r) for r in res.runs],
        }
        rows[name] = row
        lines.append(
            f"{name:<24} {seconds:>8.2f} {res.best_wall_s:>10.2f} {row['gb_per_s']:>6.2f} "
            f"{row['ratio_to_average']:>7.2f} {rss_mb:>12.0f} {row['rss_pct_of_inputs']:>8.1f}% "
            + (f"{startup_mb:>12.0f}" if startup_mb is not None else f"{'?':>12}")
        )
    lines.append("")
    ratios: dict[str, float | None] = {}
    if MERGEKIT in results:
        faster = results[MERGEKIT].best_merge_s / average
        process = results[MERGEKIT].best_wall_s / results[AVERAGE].best_wall_s
        ratios["average_vs_mergekit_speedup"] = faster
        ratios["average_vs_mergekit_speedup_process"] = process
        ratios["average_vs_mergekit_speedup_round_median"] = _round_median(
            results[MERGEKIT], results[AVERAGE]
        )
        lines.append(
            f"average vs mergekit linear: {faster:.2f}x faster (target >= 2x) "
            f"[whole process: {process:.2f}x; median of per-round ratios: "
            f"{ratios['average_vs_mergekit_speedup_round_median']:.2f}x]"
        )
    else:
        ratios["average_vs_mergekit_speedup"] = None
        lines.append("average vs mergekit linear: n/a (mergekit not available)")
    for key, name, target in (
        ("selection_over_average", SELECTION, "<= 1.3"),
        ("resample_over_average", RESAMPLE, "<= 1.6"),
    ):
        ratios[key] = results[name].best_merge_s / average
        ratios[key + "_round_median"] = _round_median(results[name], results[AVERAGE])
        lines.append(
            f"{name} / average: {ratios[key]:.2f} (target {target}) "
            f"[median of per-round ratios: {ratios[key + '_round_median']:.2f}]"
        )
    for name, fused in TORCH_KERNELS.items():
        if name in results:
            key = f"{fused.replace('+', '_')}_fused_speedup"
            ratios[key] = results[name].best_merge_s / results[fused].best_merge_s
            ratios[key + "_round_median"] = _round_median(results[name], results[fused])
            lines.append(
                f"{fused}: fused kernels {ratios[key]:.2f}x faster than the torch kernels "
                f"[median of per-round ratios: {ratios[key + '_round_median']:.2f}x]"
            )
    for name, counterpart in STREAMING.items():
        if name in results:
            key = f"{name.replace(' ', '_')}_over_all_at_once"
            ratios[key] = results[name].best_merge_s / results[counterpart].best_merge_s
            lines.append(f"{name} / {counterpart}: {ratios[key]:.2f}")
    ours = [results[n] for n in (AVERAGE, SELECTION, RESAMPLE)]
    worst = max(ours, key=lambda r: r.peak_rss_kb)
    pct = 100 * worst.peak_rss_kb * 1024 / inputs.replica_bytes
    ratios["peak_rss_pct_of_inputs"] = pct
    lines.append(f"peak RSS / inputs: {pct:.1f}% (worst of our methods: {worst.name})")
    if identical is not None:
        lines.append("average bit-identical to mergekit linear: " + ("yes" if identical else "NO"))
    summary = {"methods": rows, "ratios": ratios, "bit_identical_to_mergekit": identical}
    return "\n".join(lines), summary


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=4, help="number of replicas (default 4)")
    parser.add_argument(
        "--total-gb", type=float, default=1.5, help="summed size of the K replica files in GB"
    )
    parser.add_argument("--hidden", type=int, help="hidden size (default: from --total-gb)")
    parser.add_argument("--layers", type=int, help="layer count (default: from --total-gb)")
    parser.add_argument(
        "--unchanged",
        type=float,
        default=0.3,
        help="fraction of each replica's elements left equal to the base (default 0.3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; best is kept")
    parser.add_argument(
        "--workdir", type=Path, help="keep inputs (reused when the spec matches) and outputs here"
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="also time the streaming merge (merge_checkpoints_streaming) of each method",
    )
    parser.add_argument(
        "--kernels",
        choices=["auto", "torch", "fused", "both"],
        default="auto",
        help="merge kernels (SELMERGE_KERNELS); 'both' also times each method on the torch "
        "kernels and checks that the two give the same bits",
    )
    parser.add_argument("--mergekit-bin", help="path of mergekit-pytorch (default: auto-detect)")
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit baseline")
    parser.add_argument(
        "--no-flush", action="store_true", help="do not add the post-run os.sync() to merge s"
    )
    parser.add_argument("--json", type=Path, help="write the numbers to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.k < 2:
        parser.error("--k must be >= 2")
    if not 0 <= args.unchanged < 1:
        parser.error("--unchanged must be in [0, 1)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0

    mergekit_bin = None if args.no_mergekit else find_mergekit(args.mergekit_bin)
    if mergekit_bin is None:
        print(
            "mergekit-pytorch not found (or --no-mergekit): skipping the mergekit baseline "
            "and the bit-identity check",
            flush=True,
        )

    cleanup = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="merge_bench_")) if cleanup else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        shape = choose_shape(args.total_gb, args.k, args.hidden, args.layers)
        inputs = make_inputs(workdir, shape, args.k, args.unchanged, args.seed)
        print(
            f"inputs: {args.k} replicas + base, {inputs.num_tensors} tensors each "
            f"(hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}, ffn "
            f"{shape.ffn}), {inputs.replica_bytes / GB:.3f} GB of replicas + "
            f"{inputs.base_bytes / GB:.3f} GB base, {args.unchanged:.0%} unchanged; "
            f"{os.cpu_count()} cpus",
            flush=True,
        )
        warm = warm_page_cache([*inputs.replicas, inputs.base])
        print(f"page cache warmed in {warm:.1f} s", flush=True)

        methods = [AVERAGE, SELECTION, RESAMPLE, FLOOR]
        if mergekit_bin is not None:
            methods.insert(3, MERGEKIT)
        if args.streaming:
            methods += list(STREAMING)
        if args.kernels == "both":
            methods += list(TORCH_KERNELS)
        results = {
            m: MethodResult(
                m,
                inputs.replica_bytes
                + (inputs.base_bytes if STREAMING.get(m, m) == RESAMPLE else 0),
            )
            for m in methods
        }
        outputs: dict[str, Path | None] = {}
        for repeat in range(args.repeats):
            for method in methods:
                run, out = run_method(
                    method, inputs, workdir, repeat, not args.no_flush, mergekit_bin, args.kernels
                )
                results[method].runs.append(run)
                outputs[method] = out
                print(
                    f"  run {repeat + 1}/{args.repeats} {method:<24} merge {run.merge_s:7.2f} s "
                    f"(flush {run.flush_s:.2f}) process {run.wall_s:7.2f} s  "
                    f"peak RSS {run.maxrss_kb / 1024:7.0f} MB",
                    flush=True,
                )
                # Keep only the outputs compared below; free disk and page cache otherwise.
                compared = (AVERAGE, MERGEKIT, *TORCH_KERNELS.values(), *TORCH_KERNELS)
                if out is not None and (method not in compared or repeat < args.repeats - 1):
                    shutil.rmtree(out, ignore_errors=True)

        identical = None
        problems: list[str] = []
        if mergekit_bin is not None:
            ours, theirs = outputs[AVERAGE], outputs[MERGEKIT]
            assert ours is not None and theirs is not None
            problems = run_helper(
                {"task": "compare", "ours": str(ours), "theirs": str(theirs)}, workdir
            )["problems"]
            identical = not problems
        for torch_run, fused_run in TORCH_KERNELS.items():
            if torch_run in outputs:
                mismatches = run_helper(
                    {
                        "task": "compare",
                        "ours": str(outputs[fused_run]),
                        "theirs": str(outputs[torch_run]),
                    },
                    workdir,
                )["problems"]
                print(
                    f"{fused_run}: fused and torch kernels bit-identical: "
                    + ("yes" if not mismatches else f"NO ({len(mismatches)} tensors differ)"),
                    flush=True,
                )
                problems += [f"{fused_run} fused vs torch: {m}" for m in mismatches]

        table, summary = report(results, inputs, identical)
        print()
        print(table)
        if problems:
            print("\n" + "!" * 78, file=sys.stderr)
            print(
                "MISMATCH: outputs that must be bit-identical differ:",
                file=sys.stderr,
            )
            for line in problems[:20]:
                print("  " + line, file=sys.stderr)
            if len(problems) > 20:
                print(f"  ... and {len(problems) - 20} more tensors", file=sys.stderr)
            print("!" * 78, file=sys.stderr)
        if args.json is not None:
            summary["config"] = {
                "k": args.k,
                "total_gb_requested": args.total_gb,
                "replica_bytes": inputs.replica_bytes,
                "base_bytes": inputs.base_bytes,
                "num_tensors": inputs.num_tensors,
                "shape": asdict(shape),
                "unchanged": args.unchanged,
                "seed": args.seed,
                "repeats": args.repeats,
                "flush_counted": not args.no_flush,
                "mergekit_bin": None if mergekit_bin is None else str(mergekit_bin),
                "python": sys.executable,
                "cpus": os.cpu_count(),
            }
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
            print(f"\nwrote {args.json}")
        return 1 if problems else 0
    except ChildFailed as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(workdir / "out", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
