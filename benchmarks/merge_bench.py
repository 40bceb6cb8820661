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
    a float32 accumulator (``acc.copy_(r0); acc.add_(r_k)``, 1M-element chunks), writing nothing;
  - ``write floor``: writing one output (replica 0's tensors, copied into memory first)
    through the merge's own writer in the merge's chunks, and ``fsync``-ing it, computing
    nothing. Read floor + write floor is what the hardware allows any merge that reads its
    inputs and writes its result; the report prints the average against both.

  "merge s" is the time inside the child from just before the merge call to its return (imports
  and interpreter start-up excluded), plus the time of an ``os.sync()`` the parent runs right
  after the child exits, so every method is charged for getting its output to disk whether or
  not it fsyncs itself (``--no-flush`` leaves the sync out). "process s" is the whole child's
  wall time (start-up and imports included; mergekit imports transformers, which takes seconds).
  Each column reports the best of the repeats. GB/s is the input bytes the method reads (the K
  replicas, plus the base for resample; the write floor: the bytes it writes) per merge second.
  Ratios use merge seconds: the best run of one method over the best of the other, and the
  median over rounds of the ratio within a round (the methods run round-robin, so a round's
  runs share the machine's state).
* Checks that our average is bit-identical to mergekit's linear output (``torch.equal`` on every
  tensor, same names); on any mismatch it says so loudly and exits with status 1.

The synthetic inputs are made by ``synthetic_checkpoints.py``; what each child runs is in
``merge_bench_tasks.py``, the table and the ratios in ``merge_bench_report.py``. Our merge runs
under this interpreter (``sys.executable``) with ``PYTHONPATH`` set to the
repository root; mergekit under the interpreter of its console script. Run from the repository
root, e.g.::

    python benchmarks/merge_bench.py --mergekit-bin /path/to/venv/bin/mergekit-pytorch
    python benchmarks/merge_bench.py --total-gb 0.1 --repeats 1 --json /tmp/merge_bench.json

The default size (1.5 GB of replicas) needs about 4 GB of disk and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from merge_bench_report import MethodResult, Run, report
from merge_bench_tasks import (
    AVERAGE,
    MERGEKIT,
    MERGEKIT_WRAPPER,
    READ_FLOOR,
    RESAMPLE,
    SELECTION,
    STREAMING,
    TORCH_KERNELS,
    WRITE_FLOOR,
    child_main,
    find_mergekit,
    python_entry_point,
)
from synthetic_checkpoints import GB, Inputs, ModelShape, choose_shape, warm_page_cache

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        interpreter = python_entry_point(mergekit_bin)
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
    return run, (out if task != READ_FLOOR else None)


def _bytes_moved(task: str, inputs: Inputs, k: int) -> int:
    """The bytes a task reads (the K replicas, and the base for resample), or for the write
    floor the bytes it writes (one merged output)."""
    if task == WRITE_FLOOR:
        return inputs.replica_bytes // k
    return inputs.replica_bytes + (
        inputs.base_bytes if STREAMING.get(task, task) == RESAMPLE else 0
    )


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

        methods = [AVERAGE, SELECTION, RESAMPLE, READ_FLOOR, WRITE_FLOOR]
        if mergekit_bin is not None:
            methods.insert(3, MERGEKIT)
        if args.streaming:
            methods += list(STREAMING)
        if args.kernels == "both":
            methods += list(TORCH_KERNELS)
        results = {m: MethodResult(m, _bytes_moved(m, inputs, args.k)) for m in methods}
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
