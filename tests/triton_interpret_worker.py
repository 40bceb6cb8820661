"""``TRITON_INTERPRET=1 python tests/triton_interpret_worker.py``: the fused CUDA kernels
(:mod:`lightning_selmerge.merging.kernels.triton_cuda`) run by Triton's interpreter on CPU
tensors, case by case against the torch kernels; prints one JSON line ``{case id: result}``.
Where a GPU is, tests/test_triton_kernels.py runs the same cases compiled, on CUDA tensors.

A process of its own: Triton reads ``TRITON_INTERPRET`` when it (and the kernels) are imported,
and a process cannot mix interpreted and compiled Triton. tests/test_triton_kernels.py runs it
and holds each case to its result. The cases' lists import without triton.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from kernel_inputs import replicas_off_base

from lightning_selmerge.merging import (
    KeyedRandom,
    NonFiniteError,
    ParameterSelection,
    WeightedAverage,
    merge_state_dicts,
)
from lightning_selmerge.merging.kernels import NONFINITE_MASKS, DrawSpec, use_kernels
from lightning_selmerge.merging.methods.base import ChunkContext
from lightning_selmerge.merging.methods.selection_kernel import bit_view

BLOCK = 1024  # triton_cuda.BLOCK, checked in main()
SELECTION_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
MEAN_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# whole blocks and a partial one (two launches), a partial block alone, whole blocks alone
_NUMELS = [BLOCK + 37, 77, 2 * BLOCK - 1, 2 * BLOCK]
_STARTS = [3, 1_000_003, 2**33 + 5]  # odd offsets, one past int32


def selection_cases() -> dict[str, dict[str, Any]]:
    """K x resample x probabilities, the dtype, size, start and moved share cycling."""
    cases = {}
    index = 0
    for k in (2, 3, 4, 5, 8, 20):
        for resample in (0, 1, 4):
            for weighted in (False, True):
                dtype = SELECTION_DTYPES[index % 4]
                case = {
                    "k": k,
                    "resample": resample,
                    "weighted": weighted,
                    "dtype": str(dtype),
                    "numel": _NUMELS[index % len(_NUMELS)],
                    "start": _STARTS[(index // 3) % 3],
                    "moved": (0.3, 1.0, 0.0)[(index // 9) % 3] if resample else 0.5,
                    "seed": index,
                    "misaligned": index % 5 == 2,
                }
                cases[f"K{k}-r{resample}-{'w' if weighted else 'u'}-{dtype}"] = case
                index += 1
    for dtype in SELECTION_DTYPES:  # every dtype on both draw kinds, with resampling
        for k, weighted in ((5, True), (8, False)):
            cases[f"K{k}-r2-{'w' if weighted else 'u'}-{dtype}-all"] = {
                "k": k,
                "resample": 2,
                "weighted": weighted,
                "dtype": str(dtype),
                "numel": BLOCK + 1,
                "start": 12345,
                "moved": 0.3,
                "seed": 100 + index,
            }
            index += 1
    for resample in (0, 1):  # the most replicas a draw takes
        cases[f"K63-r{resample}"] = {
            "k": 63,
            "resample": resample,
            "weighted": False,
            "dtype": "torch.bfloat16",
            "numel": 300,
            "start": 7,
            "moved": 0.2,
            "seed": 200 + resample,
        }
    return cases


def mean_cases() -> dict[str, dict[str, Any]]:
    """K x dtype, values spread from subnormal to large so that every rounding path shows."""
    cases = {}
    for k in (1, 2, 3, 5, 8, 20):
        for index, dtype in enumerate(MEAN_DTYPES):
            cases[f"K{k}-{dtype}"] = {
                "k": k,
                "dtype": str(dtype),
                "numel": (BLOCK + 37, 2 * BLOCK)[(k + index) % 2],
                "seed": k,
                "misaligned": (k + index) % 3 == 0,
            }
    return cases


def nonfinite_cases() -> dict[str, dict[str, Any]]:
    """One NaN/Inf element in one replica: selection (plain, resample) and the mean."""
    cases = {}
    for dtype in SELECTION_DTYPES:
        for resample, bad in ((0, "nan"), (1, "inf"), (0, "-inf")):
            cases[f"select-r{resample}-{bad}-{dtype}"] = {
                "method": "selection",
                "resample": resample,
                "bad": bad,
                "dtype": str(dtype),
            }
    for dtype in MEAN_DTYPES:
        # float16 replicas cannot overflow a float32 sum, nor their mean a float16
        for bad in ("nan", "inf") if dtype == torch.float16 else ("nan", "inf", "overflow"):
            cases[f"mean-{bad}-{dtype}"] = {"method": "mean", "bad": bad, "dtype": str(dtype)}
    return cases


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _misaligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values in a view one element into a new buffer (its data pointer not on a
    16-byte boundary, as a chunk inside a tensor may be): the kernels' unaligned launches."""
    return torch.cat([tensor[:1], tensor])[1:]


def _probabilities(k, seed):
    raw = torch.rand(k, generator=torch.Generator().manual_seed(seed)) + 0.05
    probabilities = (raw / raw.sum()).tolist()
    probabilities[-1] = 1.0 - sum(probabilities[:-1])
    return probabilities


def _select(kernels, method, ctx, replicas, base):
    """The fused kernel's output and flag, as :func:`fused_merge_chunk` calls it."""
    out = torch.empty_like(replicas[0])
    spec = DrawSpec.of(method, ctx, len(replicas))
    finite = kernels.select_chunk(
        spec,
        [bit_view(r) for r in replicas],
        bit_view(base) if method.resample > 0 else None,
        bit_view(out),
        NONFINITE_MASKS[out.dtype],
    )
    return out, finite


def _differences(out, expected) -> int:
    return int((bit_view(out) != bit_view(expected)).sum())


def run_selection(kernels, case, device="cpu") -> dict[str, Any]:
    dtype = _dtype(case["dtype"])
    k = case["k"]
    probabilities = _probabilities(k, case["seed"]) if case["weighted"] else None
    method = ParameterSelection(probabilities=probabilities, resample=case["resample"])
    replicas, base = replicas_off_base(k, case["numel"], dtype, case["moved"], case["seed"], device)
    if case.get("misaligned"):
        replicas, base = [_misaligned(r) for r in replicas], _misaligned(base)
    ctx = ChunkContext(KeyedRandom(case["seed"]), "layers.0.weight", case["start"])
    expected = method.merge_chunk(ctx, replicas, base)
    out, finite = _select(kernels, method, ctx, replicas, base)
    spec = DrawSpec.of(method, ctx, k)
    return {
        "finite": finite,
        "differences": _differences(out, expected),
        "draws": "threshold" if spec.thresholds else f"lane{spec.lane_bits}",
    }


def _spread(numel, dtype, generator):
    """Values from subnormal to large (but summing finitely) in ``dtype``."""
    low, high = (-26, 12) if dtype == torch.float16 else (-140, 100)
    exponents = torch.randint(low, high, (numel,), generator=generator).to(torch.float64)
    values = torch.randn(numel, generator=generator, dtype=torch.float64) * exponents.exp2()
    return values.to(dtype)


def run_mean(kernels, case, device="cpu") -> dict[str, Any]:
    dtype = _dtype(case["dtype"])
    generator = torch.Generator().manual_seed(case["seed"])
    replicas = [_spread(case["numel"], dtype, generator).to(device) for _ in range(case["k"])]
    if case.get("misaligned"):
        replicas = [_misaligned(r) for r in replicas]
    expected = WeightedAverage().merge_chunk(ChunkContext(KeyedRandom(0), "w", 0), replicas, None)
    out = torch.empty_like(replicas[0])
    finite = kernels.mean_chunk(replicas, out)
    subnormal = (expected != 0) & (expected.abs() < torch.finfo(dtype).tiny)
    return {
        "finite": finite,
        "differences": _differences(out, expected),
        "subnormal_outputs": int(subnormal.sum()),
    }


def run_nonfinite(kernels, case, device="cpu") -> dict[str, Any]:
    dtype = _dtype(case["dtype"])
    replicas, base = replicas_off_base(4, BLOCK + 5, dtype, 0.5, seed=9, device=device)
    ctx = ChunkContext(KeyedRandom(0), "w", 11)
    if case["method"] == "selection":
        method = ParameterSelection(resample=case["resample"])
        clean, clean_finite = _select(kernels, method, ctx, replicas, base)
        # an element the merge does not take from replica 3
        loser = int((bit_view(clean) != bit_view(replicas[3])).nonzero()[-1])
        replicas[3][loser] = float(case["bad"])
        out, finite = _select(kernels, method, ctx, replicas, base)
        expected = method.merge_chunk(ctx, replicas, base)
        return {
            "clean_finite": clean_finite,
            "finite": finite,
            "differences": _differences(out, expected),
        }
    if case["bad"] == "overflow":  # finite replicas whose float32 sum is not
        for replica in replicas:
            replica[5] = torch.finfo(dtype).max
    else:
        replicas[1][5] = float(case["bad"])
    expected = WeightedAverage().merge_chunk(ctx, replicas, None)
    out = torch.empty_like(replicas[0])
    finite = kernels.mean_chunk(replicas, out)
    nan = expected.isnan()
    return {
        "clean_finite": True,
        "finite": finite,
        "differences": _differences(out[~nan], expected[~nan]),
        "nan_bits": sorted({int(b) & 0xFFFF for b in bit_view(out)[nan].tolist()})
        if out.element_size() == 2
        else [],
        "nan_where_torch_has_nan": bool(out[nan].isnan().all()),
    }


def _states(dtype=torch.bfloat16, k=3):
    generator = torch.Generator().manual_seed(5)
    base = {
        "embed.weight": torch.randn(37, 29, generator=generator).to(dtype),
        "norm.weight": torch.randn(29, generator=generator).to(dtype),
        "step": torch.tensor(5),
    }
    replicas = []
    for _ in range(k):
        replica = {}
        for name, tensor in base.items():
            replica[name] = tensor.clone()
            if tensor.is_floating_point():
                moved = torch.rand(tensor.shape, generator=generator) < 0.5
                noise = torch.randn(tensor.shape, generator=generator).to(dtype)
                replica[name][moved] = noise[moved]
        replicas.append(replica)
    return base, replicas


def run_dispatch(kernels) -> dict[str, Any]:
    """The merge driver takes the fused kernels (registered for CPU tensors here) chunk by chunk
    and gets the torch kernels' bits; a NaN is named like the torch kernels name it."""
    from lightning_selmerge.merging.kernels import dispatch

    calls = {"select_chunk": 0, "mean_chunk": 0}

    def counted(name):
        real = getattr(kernels, name)

        def wrapper(*args):
            calls[name] += 1
            return real(*args)

        return wrapper

    class Counted:
        select_chunk = staticmethod(counted("select_chunk"))
        mean_chunk = staticmethod(counted("mean_chunk"))

    sys.modules[f"{dispatch.__package__}.triton_cpu_test"] = Counted  # type: ignore[assignment]
    dispatch._BACKENDS["cpu"] = ("triton_cpu_test", "triton")
    result: dict[str, Any] = {}
    methods = {
        "selection": ParameterSelection(),
        "selection-resample": ParameterSelection(resample=2),
        "selection-weighted": ParameterSelection(probabilities=[0.2, 0.5, 0.3], resample=1),
        "mean": WeightedAverage(),
    }
    for dtype in (torch.bfloat16, torch.float16):
        base, replicas = _states(dtype)
        for name, method in methods.items():
            kwargs = {"base": base, "method": method, "seed": 3, "chunk_numel": 500}
            with use_kernels("torch"):
                expected = merge_state_dicts(replicas, **kwargs)
            with use_kernels("fused"):
                merged = merge_state_dicts(replicas, **kwargs)
            result[f"{name}-{dtype}"] = all(torch.equal(merged[n], expected[n]) for n in base)
    base, replicas = _states()
    replicas[1]["norm.weight"][17] = float("nan")
    for name in ("selection-resample", "mean"):
        try:
            with use_kernels("fused"):
                merge_state_dicts(replicas, base=base, method=methods[name])
            result[f"nan-{name}"] = "no error"
        except NonFiniteError as error:
            result[f"nan-{name}"] = str(error)
    result["calls"] = calls
    return result


def _index_zero_dim_arrays() -> None:
    """Triton before 3.7 interprets a loop bound (``range(num_replicas)``) with ``int()`` of a
    one-element array, which numpy 2.4 refuses; 3.7 squeezes it first. Do as 3.7 does."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes = True
    interpreter._patch_lang_tensor = patched


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    _index_zero_dim_arrays()
    from lightning_selmerge.merging.kernels import triton_cuda

    assert triton_cuda.BLOCK == BLOCK, (triton_cuda.BLOCK, BLOCK)
    assert type(triton_cuda._select_kernel).__name__ == "InterpretedFunction"
    results: dict[str, Any] = {}
    for group, cases, run in (
        ("selection", selection_cases(), run_selection),
        ("mean", mean_cases(), run_mean),
        ("nonfinite", nonfinite_cases(), run_nonfinite),
    ):
        results[group] = {name: run(triton_cuda, case) for name, case in cases.items()}
    empty = torch.empty(0, dtype=torch.bfloat16)
    results["empty"] = triton_cuda.mean_chunk([empty, empty], empty.clone())
    results["dispatch"] = run_dispatch(triton_cuda)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
