"""What the children of ``merge_bench.py`` run, each in its own process so that peak RSS is per
task: one of our merges, the read or write floor, generating the inputs or comparing two outputs
(``child_main``); and mergekit's console script, timed in-process (``MERGEKIT_WRAPPER``)."""

from __future__ import annotations

import json
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from synthetic_checkpoints import generate_files

CHUNK_NUMEL = 1 << 20

AVERAGE = "average"
SELECTION = "selection"
RESAMPLE = "selection+resample(4)"
MERGEKIT = "mergekit linear"
READ_FLOOR = "read floor"
WRITE_FLOOR = "write floor"
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


def _proc_status_kb(field_name: str) -> int:
    """``VmRSS`` or ``VmHWM`` (this mm only: unlike ``ru_maxrss``, not inherited over exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _read_floor(replicas: list[str]) -> float:
    """Seconds to read the K inputs once through their memory maps into a float32 accumulator
    (``acc.copy_(r0); acc.add_(r_k)``, 1M-element chunks), writing nothing."""
    import torch

    from lightning_selmerge.merging.safetensors_io import CheckpointReader

    began = time.perf_counter()
    readers = [CheckpointReader(p) for p in replicas]
    acc = torch.empty(CHUNK_NUMEL, dtype=torch.float32)
    for name in readers[0].names():
        flat = [r.tensor(name).reshape(-1) for r in readers]
        for begin in range(0, flat[0].numel(), CHUNK_NUMEL):
            end = min(begin + CHUNK_NUMEL, flat[0].numel())
            part = acc[: end - begin]
            part.copy_(flat[0][begin:end])
            for other in flat[1:]:
                part.add_(other[begin:end])
        del flat
        for reader in readers:
            reader.release(name)
    for reader in readers:
        reader.close()
    return time.perf_counter() - began


def _write_floor(replica: str, out: Path) -> float:
    """Seconds to write one output (replica 0's tensors, copied into memory before the clock)
    through the merge's own writer, in the merge's chunks, and ``fsync`` it: what any merge
    pays for its output, computing nothing."""
    from lightning_selmerge.merging.safetensors_io import (
        CheckpointReader,
        ShardedSafetensorsWriter,
    )

    reader = CheckpointReader(replica)
    infos = [(name, reader.info(name)) for name in reader.names()]
    tensors = {name: reader.tensor(name).reshape(-1).clone() for name, _ in infos}
    reader.close()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    writer = ShardedSafetensorsWriter(out, infos)
    for name, flat in tensors.items():
        for begin in range(0, flat.numel(), CHUNK_NUMEL):
            writer.write(name, flat[begin : begin + CHUNK_NUMEL])
    writer.close()
    return time.perf_counter() - began


def child_main(spec_path: str) -> None:
    """Run one task described by a JSON spec (a merge of ours, a floor, generating the inputs or
    comparing two outputs); write a JSON result."""
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
    from lightning_selmerge.merging.kernels.dispatch import AUTO_MIN_REPLICA_BYTES, merge_size
    from lightning_selmerge.merging.streaming import merge_state_dicts_streaming
    from lightning_selmerge.merging.streaming_files import merge_checkpoints_streaming

    imported = time.perf_counter()
    rss_after_import = _proc_status_kb("VmRSS")
    task = spec["task"]
    if task == READ_FLOOR:
        merge_s = _read_floor(spec["replicas"])
    elif task == WRITE_FLOOR:
        merge_s = _write_floor(spec["replicas"][0], Path(spec["out"]))
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
        with merge_size(AUTO_MIN_REPLICA_BYTES):  # auto would leave so small a merge on torch
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


def python_entry_point(script: Path) -> str | None:
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
