"""The fused CUDA kernels (Triton) give the torch kernels' bits.

No GPU runs here or in CI: the kernels run in Triton's interpreter on CPU tensors, in a process of
its own (tests/triton_interpret_worker.py: Triton reads ``TRITON_INTERPRET`` at import, and one
process cannot mix interpreted and compiled kernels), and are compiled for sm_90 here to check the
instructions their arithmetic becomes (the interpreter computes with numpy, a GPU does not).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if sys.platform == "linux" and platform.machine() == "x86_64":
    import triton  # a dev dependency on this platform: missing it fails here, never skips
else:  # pragma: no cover - no triton wheel for this platform
    triton = pytest.importorskip("triton")

from triton_interpret_worker import (
    BLOCK,
    _states,
    mean_cases,
    nonfinite_cases,
    run_mean,
    run_nonfinite,
    run_selection,
    selection_cases,
)

from lightning_selmerge.merging.kernels import dispatch, triton_cuda

TESTS = Path(__file__).parent
KERNELS_FILE = Path(triton_cuda.__file__)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="runs the compiled kernels on a CUDA GPU; the interpreted ones run everywhere",
)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every case's result from the interpreter worker (one process for all of them)."""
    kept = [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), *kept]),
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS / "triton_interpret_worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=TESTS.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", sorted(selection_cases()))
def test_selection_gives_the_torch_kernels_bits(interpreted, case):
    result = interpreted["selection"][case]
    assert result["differences"] == 0, result
    assert result["finite"] is True


def test_the_selection_cases_draw_every_way(interpreted):
    """Shared 8- and 16-bit lanes and per-candidate thresholds, with and without resample (one
    draw takes a 16-bit lane only from 512 replicas up); every dtype."""
    cases = selection_cases()
    seen = {(r["draws"], cases[c]["resample"] > 0) for c, r in interpreted["selection"].items()}
    ways = {(d, r) for d in ("lane8", "lane16", "threshold") for r in (False, True)}
    assert seen == ways - {("lane16", False)}
    assert {case["dtype"] for case in cases.values()} == {
        "torch.bfloat16",
        "torch.float16",
        "torch.float32",
        "torch.float64",
    }


@pytest.mark.parametrize("case", sorted(mean_cases()))
def test_the_mean_rounds_like_the_torch_kernel(interpreted, case):
    result = interpreted["mean"][case]
    assert result["differences"] == 0, result
    assert result["finite"] is True


def test_the_mean_cases_reach_subnormal_outputs(interpreted):
    for dtype in ("torch.bfloat16", "torch.float16", "torch.float32"):
        subnormal = [r["subnormal_outputs"] for c, r in interpreted["mean"].items() if dtype in c]
        assert sum(subnormal) > 0, dtype


@pytest.mark.parametrize("case", sorted(nonfinite_cases()))
def test_a_nonfinite_input_clears_the_finite_flag(interpreted, case):
    result = interpreted["nonfinite"][case]
    assert result["clean_finite"] is True
    assert result["finite"] is False
    assert result["differences"] == 0, result  # the mean: where torch's output is not NaN
    if case.startswith("mean"):
        assert result["nan_where_torch_has_nan"]
        assert set(result["nan_bits"]) <= {0x7FFF}  # the canonical NaN of cvt.rn


def test_the_merge_driver_takes_them_and_names_a_nan(interpreted):
    result = interpreted["dispatch"]
    calls = result.pop("calls")
    assert calls["select_chunk"] > 0 and calls["mean_chunk"] > 0
    for name in ("nan-selection-resample", "nan-mean"):
        message = result.pop(name)
        assert "'norm.weight'" in message and "replica 1" in message and "index 17" in message
    assert result and all(result.values()), result


def test_an_empty_chunk_is_finite(interpreted):
    assert interpreted["empty"] is True


def test_dispatch_sends_cuda_chunks_to_triton():
    assert dispatch._BACKENDS["cuda"] == ("triton_cuda", "triton")
    assert set(dispatch._MEAN_DTYPES["cuda"]) == {torch.bfloat16, torch.float16, torch.float32}


def test_the_entry_points_refuse_what_they_do_not_merge():
    halves = [torch.zeros(4, dtype=torch.float64) for _ in range(2)]
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        triton_cuda.mean_chunk(halves, torch.empty(4, dtype=torch.float64))
    mixed = [torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="one dtype on one device"):
        triton_cuda.mean_chunk(mixed, torch.empty(4))


def test_the_module_imports_without_triton(monkeypatch):
    """tests/test_doctests.py imports every module; without triton this one still imports, and
    its entry points say what to install."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location(
        f"{dispatch.__package__}._triton_cuda_without_triton", KERNELS_FILE
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    with pytest.raises(ModuleNotFoundError, match="pip install triton"):
        module.mean_chunk([torch.zeros(2)] * 2, torch.empty(2))


MEAN_SIGNATURE = {
    "table": "*i64",
    "flags": "*i32",
    "first": "i32",
    "numel": "i32",
    "num_replicas": "i32",
    "KIND": "constexpr",
    "MASKED": "constexpr",
    "ALIGNED": "constexpr",
    "BLOCK": "constexpr",
}
SELECT_SIGNATURE = {
    "table": "*i64",
    "flags": "*i32",
    "first": "i32",
    "numel": "i32",
    "start": "i64",
    "num_replicas": "i32",
    "candidates": "i32",
    "bits": "i32",
    "num_thresholds": "i32",
    "SHARED": "constexpr",
    "LANE_BITS": "constexpr",
    "RESAMPLE": "constexpr",
    "MASK": "constexpr",
    "MASKED": "constexpr",
    "ALIGNED": "constexpr",
    "BLOCK": "constexpr",
}


def _select_constexprs(shared, resample, mask):
    return {
        "SHARED": shared,
        "LANE_BITS": 16,
        "RESAMPLE": resample,
        "MASK": mask,
        "BLOCK": triton_cuda.BLOCK,
    }


def _compile(kernel, signature, constexprs, aligned_out=False):
    """The kernel's PTX for sm_90; ``aligned_out``: as Triton launches it with an ``out`` on a
    16-byte boundary (it specialises pointer arguments so)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(1,): [["tt.divisibility", 16]]} if aligned_out else {}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": triton_cuda._NUM_WARPS, "enable_fp_fusion": False}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="this process interprets the kernels"
)
def test_compiled_for_sm90_they_round_like_torchs_cuda_ops(tmp_path, monkeypatch):
    """IEEE division (``div.rn``, not ``div.full``), adds that keep subnormals (no ``.ftz``), and
    float16 rounded by ``cvt.rn``: the instructions torch's CUDA ``add_``/``div_``/``copy_`` use."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for kind, out in ((0, "*i16"), (1, "*fp16"), (2, "*fp32")):
        ptx = _compile(
            triton_cuda._mean_kernel,
            {**MEAN_SIGNATURE, "out": out},
            {"KIND": kind, "MASKED": True, "ALIGNED": False, "BLOCK": triton_cuda.BLOCK},
        )
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
        assert "add.rn.f32" in ptx and ".ftz" not in ptx  # .rn: never fused into an fma
        if kind == 1:
            assert "cvt.rn.f16" in ptx
    for bits, mask, shared in (("i16", 0x7F80, False), ("i64", 0x7FF0000000000000, True)):
        ptx = _compile(
            triton_cuda._select_kernel,
            {**SELECT_SIGNATURE, "out": f"*{bits}"},
            {**_select_constexprs(shared, True, mask), "MASKED": True, "ALIGNED": False},
        )
        assert "shr.u64" in ptx and "mul.lo.s64" in ptx  # SplitMix64: logical shifts, wrapping


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="this process interprets the kernels"
)
def test_whole_aligned_blocks_move_16_bytes_per_load_and_store(tmp_path, monkeypatch):
    """A chunk's whole blocks, every pointer on a 16-byte boundary: each thread loads and stores
    16 bytes at a time (``.v4.b32``), as a copy at the card's bandwidth does; the masked or
    unaligned launch loads element by element."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    def moves(kernel, signature, constexprs, masked, aligned):
        ptx = _compile(
            kernel, signature, {**constexprs, "MASKED": masked, "ALIGNED": aligned}, True
        )
        return ("ld.global.v4.b32" in ptx, "st.global.v4.b32" in ptx)

    mean = (triton_cuda._mean_kernel, {**MEAN_SIGNATURE, "out": "*i16"})
    mean_constexprs = {"KIND": 0, "BLOCK": triton_cuda.BLOCK}
    assert moves(*mean, mean_constexprs, masked=False, aligned=True) == (True, True)
    assert moves(*mean, mean_constexprs, masked=True, aligned=True) == (False, False)
    assert moves(*mean, mean_constexprs, masked=False, aligned=False) == (False, True)
    select = (triton_cuda._select_kernel, {**SELECT_SIGNATURE, "out": "*i16"})
    for resample in (False, True):
        constexprs = _select_constexprs(False, resample, 0x7F80)
        assert moves(*select, constexprs, masked=False, aligned=True) == (True, True)
        assert moves(*select, constexprs, masked=True, aligned=True)[0] is False


def test_the_cases_take_every_launch():
    """Whole blocks alone, a partial block alone, both; 16-byte aligned and unaligned inputs."""
    for cases in (selection_cases(), mean_cases()):
        shapes = {(c["numel"] >= BLOCK, c["numel"] % BLOCK > 0) for c in cases.values()}
        assert {(True, True), (True, False)} <= shapes
        assert {c.get("misaligned", False) for c in cases.values()} == {False, True}
    assert any(c["numel"] < BLOCK for c in selection_cases().values())


@needs_gpu
def test_compiled_on_a_gpu_they_give_the_torch_cuda_kernels_bits():
    """The interpreter's cases, compiled, on CUDA tensors, against torch's CUDA kernels (NaN
    outputs aside: a chunk flagged non-finite is never kept, so their bits are not compared)."""
    failures = {}
    for name, case in selection_cases().items():
        result = run_selection(triton_cuda, case, device="cuda")
        if result["differences"] or not result["finite"]:
            failures[name] = result
    for name, case in mean_cases().items():
        result = run_mean(triton_cuda, case, device="cuda")
        if result["differences"] or not result["finite"]:
            failures[name] = result
    for name, case in nonfinite_cases().items():
        result = run_nonfinite(triton_cuda, case, device="cuda")
        if result["finite"] or result["differences"]:
            failures[name] = result
    assert not failures, failures


@needs_gpu
def test_on_a_gpu_the_merge_driver_takes_them(monkeypatch):
    from lightning_selmerge.merging import ParameterSelection, WeightedAverage, merge_state_dicts
    from lightning_selmerge.merging.kernels import use_kernels

    calls = []
    for name in ("select_chunk", "mean_chunk"):
        real = getattr(triton_cuda, name)
        monkeypatch.setattr(
            triton_cuda,
            name,
            lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args),
        )
    base, replicas = _states(torch.bfloat16)
    base = {n: t.cuda() for n, t in base.items()}
    replicas = [{n: t.cuda() for n, t in r.items()} for r in replicas]
    for method in (ParameterSelection(), ParameterSelection(resample=2), WeightedAverage()):
        kwargs = {"base": base, "method": method, "seed": 3, "chunk_numel": 500}
        with use_kernels("torch"):
            expected = merge_state_dicts(replicas, **kwargs)
        with use_kernels("fused"):
            merged = merge_state_dicts(replicas, **kwargs)
        for name in base:
            assert merged[name].device == replicas[0][name].device
            assert torch.equal(merged[name].cpu(), expected[name].cpu()), (method, name)
    assert {"select_chunk", "mean_chunk"} <= set(calls)
