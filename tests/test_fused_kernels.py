"""The fused CPU kernels (numba) give the torch kernels' bits, and the dispatch picks them."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import replicas_off_base

from lightning_selmerge.merging import (
    KeyedRandom,
    MergeError,
    NonFiniteError,
    ParameterSelection,
    WeightedAverage,
    merge_checkpoints,
    merge_state_dicts,
)
from lightning_selmerge.merging.kernels import (
    KERNELS_ENV,
    DrawSpec,
    dispatch,
    fused_merge_chunk,
    kernel_setting,
    numba_bits,
    numba_cpu,
    use_kernels,
)
from lightning_selmerge.merging.keyed_random import UNIFORM_LEVELS
from lightning_selmerge.merging.methods.base import ChunkContext
from lightning_selmerge.merging.methods.selection_kernel import bit_view

SELECTION_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _fused(method, ctx, replicas, base):
    out = torch.empty_like(replicas[0])
    finite = fused_merge_chunk(method, ctx, replicas, base, out)
    assert finite is not None, "no fused kernel took the chunk"
    return out, finite


@settings(max_examples=50, deadline=None)
@given(
    num_replicas=st.one_of(st.integers(2, 20), st.integers(21, 63)),  # > 32: 64-bit masks
    resample=st.integers(0, 4),
    dtype=st.sampled_from(SELECTION_DTYPES),
    numel=st.integers(1, 3 * numba_cpu.BLOCK + 5),
    start=st.integers(0, 10**9),
    moved_share=st.sampled_from([0.0, 0.3, 1.0]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_selection_copies_the_torch_kernels_bits(
    num_replicas, resample, dtype, numel, start, moved_share, weighted, seed
):
    probabilities = None
    if weighted:
        raw = torch.rand(num_replicas, generator=torch.Generator().manual_seed(seed)) + 0.05
        probabilities = (raw / raw.sum()).tolist()
        probabilities[-1] = 1.0 - sum(probabilities[:-1])
    method = ParameterSelection(probabilities=probabilities, resample=resample)
    replicas, base = replicas_off_base(num_replicas, numel, dtype, moved_share, seed)
    ctx = ChunkContext(KeyedRandom(seed), "layer.weight", start)
    expected = method.merge_chunk(ctx, replicas, base)
    merged, finite = _fused(method, ctx, replicas, base)
    assert finite
    assert torch.equal(bit_view(merged), bit_view(expected))


def test_equal_thresholds_count_like_a_multiply_and_shift():
    """The kernel draws among K equally likely replicas as ``u * K >> 16``: the count of the
    thresholds at or below ``u``, for every 16-bit ``u`` and every K selection allows."""
    uniforms = torch.arange(UNIFORM_LEVELS, dtype=torch.int64)
    for num_replicas in range(2, 64):
        thresholds = torch.tensor(ParameterSelection().thresholds(num_replicas))
        counted = (uniforms[:, None] >= thresholds[None, :]).sum(dim=1)
        assert torch.equal(counted, uniforms * num_replicas >> 16), num_replicas


MEAN_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@settings(max_examples=40, deadline=None)
@given(
    num_replicas=st.integers(1, 20),
    dtype=st.sampled_from(MEAN_DTYPES),
    numel=st.integers(1, 2 * numba_cpu.BLOCK + 3),
    scale=st.sampled_from(["subnormal", "one", "near the largest"]),
    seed=st.integers(0, 2**16),
)
def test_fused_mean_rounds_like_the_torch_kernel(num_replicas, dtype, numel, scale, seed):
    info = torch.finfo(dtype)
    # randn stays within 6 sigma here, so the sums of the largest scale stay finite
    factor = {"subnormal": info.tiny, "one": 1.0, "near the largest": info.max / (6 * 20)}[scale]
    generator = torch.Generator().manual_seed(seed)
    replicas = [
        (torch.randn(numel, generator=generator) * factor).to(dtype) for _ in range(num_replicas)
    ]
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    expected = WeightedAverage().merge_chunk(ctx, replicas, None)
    merged, finite = _fused(WeightedAverage(), ctx, replicas, None)
    assert finite
    assert torch.equal(bit_view(merged), bit_view(expected))


def test_fused_selection_matches_the_plain_reference():
    replicas, base = replicas_off_base(5, 700, torch.bfloat16, 0.4, seed=1)
    for method in (ParameterSelection(), ParameterSelection(resample=2)):
        ctx = ChunkContext(KeyedRandom(7), "w", 0)
        merged, _ = _fused(method, ctx, replicas, base)
        reference = method.reference("w", replicas, base, KeyedRandom(7))
        assert torch.equal(bit_view(merged), bit_view(reference))


@pytest.mark.parametrize("dtype", SELECTION_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fused_selection_sees_a_nonfinite_input_it_did_not_select(dtype, bad):
    replicas, base = replicas_off_base(4, 3 * numba_cpu.BLOCK, dtype, 1.0, seed=2)
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    method = ParameterSelection()
    merged, _ = _fused(method, ctx, replicas, base)
    loser = next(i for i in range(merged.numel()) if not torch.equal(merged[i], replicas[3][i]))
    replicas[3][loser] = bad
    _, finite = _fused(method, ctx, replicas, base)
    assert not finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_mean_rounds_every_16_bit_pattern_like_the_torch_kernel(dtype):
    """Every bit pattern of the dtype (subnormals, Inf, NaN) meets random patterns and the
    patterns reversed: the same bits as the torch kernel, NaN as NaN wherever it comes out."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    generator = torch.Generator().manual_seed(5)
    drawn = torch.randint(-(2**15), 2**15, (every.numel(),), generator=generator)
    replicas = [bits.to(torch.int16).view(dtype) for bits in (every, drawn, every.flip(0))]
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    expected = WeightedAverage().merge_chunk(ctx, replicas, None)
    merged, finite = _fused(WeightedAverage(), ctx, replicas, None)
    assert not finite
    nan = expected.isnan()
    assert torch.equal(merged.isnan(), nan)
    assert torch.equal(bit_view(merged)[~nan], bit_view(expected)[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # float16's sum cannot
def test_fused_mean_flags_an_output_that_rounds_to_infinity(dtype):
    big = torch.finfo(dtype).max
    replicas = [torch.full((10,), big, dtype=dtype), torch.full((10,), big, dtype=dtype)]
    _, finite = _fused(WeightedAverage(), ChunkContext(KeyedRandom(0), "w", 0), replicas, None)
    assert not finite


@pytest.mark.parametrize("dtype", MEAN_DTYPES)
def test_fused_mean_over_many_stripes_gives_the_torch_bits_and_sees_the_last_nan(dtype):
    """More blocks than stripes, split unevenly, and a partial last block: every element is the
    torch kernel's, and a NaN in the very last element is seen."""
    # three replicas: 6 bytes per element in 16 bits (small blocks), 12 in float32 (large)
    block = numba_cpu.MEAN_BLOCK_MANY if dtype == torch.float32 else numba_cpu.MEAN_BLOCK
    numel = (numba_cpu.STRIPES + 3) * block + 5
    generator = torch.Generator().manual_seed(4)
    replicas = [torch.randn(numel, generator=generator).to(dtype) for _ in range(3)]
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    expected = WeightedAverage().merge_chunk(ctx, replicas, None)
    merged, finite = _fused(WeightedAverage(), ctx, replicas, None)
    assert finite and torch.equal(bit_view(merged), bit_view(expected))
    replicas[1][-1] = float("nan")
    merged, finite = _fused(WeightedAverage(), ctx, replicas, None)
    assert not finite and merged[-1].isnan()


def _states(num_replicas=4, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(3)
    base = {
        "embed.weight": torch.randn(37, 129, generator=generator).to(dtype),
        "norm.weight": torch.randn(129, generator=generator).to(dtype),
        "step": torch.tensor(5),
    }
    replicas = []
    for _ in range(num_replicas):
        state = {}
        for name, tensor in base.items():
            if not tensor.is_floating_point():
                state[name] = tensor.clone()
                continue
            noise = torch.randn(tensor.shape, generator=generator).to(dtype)
            state[name] = torch.where(
                torch.rand(tensor.shape, generator=generator) < 0.5, noise, tensor
            )
        replicas.append(state)
    return base, replicas


@pytest.mark.parametrize(
    "method",
    [ParameterSelection(), ParameterSelection(resample=3), WeightedAverage()],
    ids=["selection", "resample3", "mean"],
)
@pytest.mark.parametrize("chunk_numel", [64, 1000, 1 << 20])
def test_the_merge_drivers_give_the_same_bits_either_way(method, chunk_numel, tmp_path):
    from safetensors.torch import save_file

    base, replicas = _states(num_replicas=5)
    merged = {}
    for setting in ("torch", "fused"):
        with use_kernels(setting):
            merged[setting] = merge_state_dicts(
                replicas, base=base, method=method, seed=4, chunk_numel=chunk_numel
            )
    for name in base:
        assert torch.equal(merged["torch"][name], merged["fused"][name]), name
    paths = []
    for k, state in enumerate([base, *replicas]):
        paths.append(tmp_path / f"{k}.safetensors")
        save_file(state, paths[-1])
    for setting in ("torch", "fused"):
        with use_kernels(setting):
            merge_checkpoints(
                paths[1:],
                tmp_path / setting,
                base=paths[0],
                method=method,
                seed=4,
                chunk_numel=chunk_numel,
            )
    from safetensors.torch import load_file

    torch_files = sorted((tmp_path / "torch").glob("*.safetensors"))
    assert torch_files
    for path in torch_files:
        expected, fused = load_file(path), load_file(tmp_path / "fused" / path.name)
        assert expected.keys() == fused.keys()
        for name, tensor in expected.items():
            assert torch.equal(tensor, fused[name]), name


@pytest.mark.parametrize("method", [ParameterSelection(resample=1), WeightedAverage()])
def test_a_fused_merge_names_the_replica_that_holds_nan(method):
    base, replicas = _states()
    replicas[2]["norm.weight"][17] = float("nan")
    with use_kernels("fused"), pytest.raises(NonFiniteError, match="replica 2"):
        merge_state_dicts(replicas, base=base, method=method)
    with use_kernels("fused"):
        dropped = merge_state_dicts(replicas, base=base, method=method, nonfinite="drop")
    with use_kernels("torch"):
        expected = merge_state_dicts(replicas, base=base, method=method, nonfinite="drop")
    for name in base:
        assert torch.equal(dropped[name], expected[name])


def test_a_fused_mean_that_overflows_says_so_like_the_torch_kernel():
    big = torch.finfo(torch.float32).max
    replicas = [{"w": torch.full((8,), big)} for _ in range(2)]
    for setting in ("torch", "fused"):
        with use_kernels(setting), pytest.raises(MergeError, match="overflowed torch.float32"):
            merge_state_dicts(replicas, method=WeightedAverage())


def test_chunks_no_fused_kernel_covers_take_the_torch_kernels():
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    tensors = [torch.randn(10) for _ in range(3)]
    weighted = WeightedAverage(weights=[1.0, 2.0, 3.0])  # addcmul_ may fuse; kept on torch
    assert fused_merge_chunk(weighted, ctx, tensors, None, torch.empty(10)) is None
    doubles = [t.double() for t in tensors]  # no float64 mean kernel
    out64 = torch.empty(10, dtype=torch.float64)
    assert fused_merge_chunk(WeightedAverage(), ctx, doubles, None, out64) is None
    eights = [t.to(torch.float8_e4m3fn) for t in tensors]  # no NaN/Inf bit mask
    out = torch.empty(10, dtype=torch.float8_e4m3fn)
    assert fused_merge_chunk(ParameterSelection(), ctx, eights, None, out) is None
    with use_kernels("torch"):
        assert fused_merge_chunk(ParameterSelection(), ctx, tensors, None, torch.empty(10)) is None


def test_float16_means_take_the_torch_kernels_where_the_cpu_cannot_convert_float16(monkeypatch):
    halves = [torch.randn(10).half() for _ in range(3)]
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    monkeypatch.setattr(numba_cpu, "HOST_UNCOVERED_MEAN_DTYPES", (torch.float16,))
    assert fused_merge_chunk(WeightedAverage(), ctx, halves, None, torch.empty(10).half()) is None
    out = torch.empty(10).half()
    assert fused_merge_chunk(ParameterSelection(), ctx, halves, None, out) is not None


def test_float16_conversions_count_as_hardware_only_with_f16c_on_x86(monkeypatch):
    from numba.core import config

    monkeypatch.setattr(numba_bits.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,-f16c,+sse2")
    assert not numba_bits.float16_in_hardware()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+f16c")
    assert numba_bits.float16_in_hardware()
    monkeypatch.setattr(numba_bits.platform, "machine", lambda: "aarch64")
    assert numba_bits.float16_in_hardware()
    monkeypatch.setattr(numba_bits.platform, "machine", lambda: "ppc64le")
    assert not numba_bits.float16_in_hardware()


def _count_fused_calls(monkeypatch) -> dict[str, int]:
    from lightning_selmerge.merging.kernels import numba_streaming

    calls = {"chunks": 0}
    for module, name in [
        (numba_cpu, "select_chunk"),
        (numba_cpu, "mean_chunk"),
        (numba_streaming, "fold_selection"),
        (numba_streaming, "add_to_sum"),
    ]:
        real = getattr(module, name)

        def counted(*args, real=real, **kwargs):
            calls["chunks"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("method", [ParameterSelection(resample=1), WeightedAverage()])
def test_auto_leaves_a_merge_smaller_than_its_threshold_on_the_torch_kernels(
    method, monkeypatch, tmp_path
):
    """Below ``AUTO_MIN_REPLICA_BYTES`` of replicas ``auto`` never calls a fused kernel (in
    memory, from files, streaming); at it, it does; ``fused`` does whatever the size."""
    from safetensors.torch import save_file

    from lightning_selmerge.merging import merge_checkpoints_streaming

    base, replicas = _states(num_replicas=3)
    size = sum(dispatch.floating_bytes(r.values()) for r in replicas)
    paths = []
    for k, state in enumerate([base, *replicas]):
        paths.append(tmp_path / f"{k}.safetensors")
        save_file(state, paths[-1])
    merges = {
        "in memory": lambda out: merge_state_dicts(replicas, base=base, method=method),
        "files": lambda out: merge_checkpoints(paths[1:], out, base=paths[0], method=method),
        "streaming": lambda out: merge_checkpoints_streaming(
            paths[1:], out, base=paths[0], method=method
        ),
    }
    calls = _count_fused_calls(monkeypatch)
    for label, merge in merges.items():
        for threshold, setting, fused in [
            (size + 1, "auto", False),
            (size, "auto", True),
            (size + 1, "fused", True),
        ]:
            monkeypatch.setattr(dispatch, "AUTO_MIN_REPLICA_BYTES", threshold)
            calls["chunks"] = 0
            with use_kernels(setting):
                merge(tmp_path / f"{label}-{threshold}-{setting}")
            assert (calls["chunks"] > 0) == fused, (label, threshold, setting)


def test_auto_leaves_a_small_collective_average_on_the_torch_kernels(monkeypatch, tmp_path):
    import torch.distributed as dist

    from lightning_selmerge.merging.collective import merge_state_dicts_collective

    _, replicas = _states(num_replicas=2)
    size = sum(dispatch.floating_bytes(r.values()) for r in replicas)
    calls = _count_fused_calls(monkeypatch)
    init = f"file://{tmp_path / 'init'}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        for threshold, fused in [(size + 1, False), (size, True)]:
            monkeypatch.setattr(dispatch, "AUTO_MIN_REPLICA_BYTES", threshold)
            calls["chunks"] = 0
            with use_kernels("auto"):
                merge_state_dicts_collective(
                    dict(enumerate(replicas)), num_replicas=2, method=WeightedAverage()
                )
            assert (calls["chunks"] > 0) == fused, threshold
    finally:
        dist.destroy_process_group()


def test_the_outermost_merge_size_counts():
    with use_kernels("auto"), dispatch.merge_size(0), dispatch.merge_size(1 << 40):
        assert dispatch.fused_backend(WeightedAverage(), torch.float32, "cpu") is None
    with use_kernels("auto"), dispatch.merge_size(1 << 40), dispatch.merge_size(0):
        assert dispatch.fused_backend(WeightedAverage(), torch.float32, "cpu") is numba_cpu


def test_a_merge_size_belongs_to_its_thread():
    import threading

    entered, leave = threading.Event(), threading.Event()

    def small_merge():
        with dispatch.merge_size(0):
            entered.set()
            leave.wait()

    thread = threading.Thread(target=small_merge)
    thread.start()
    entered.wait()
    try:
        with use_kernels("auto"):
            assert dispatch.fused_backend(WeightedAverage(), torch.float32, "cpu") is numba_cpu
    finally:
        leave.set()
        thread.join()


def test_a_base_unlike_the_replicas_is_refused_before_the_kernel_reads_it():
    replicas, base = replicas_off_base(3, 100, torch.bfloat16, 0.5, seed=0)
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    out = torch.empty_like(base)
    with use_kernels("fused"), pytest.raises(ValueError, match="the base is not a contiguous"):
        fused_merge_chunk(ParameterSelection(resample=1), ctx, replicas, base[:50], out)


def test_the_kernel_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "Torch")
    assert kernel_setting() == "torch"
    with use_kernels("fused"):
        assert kernel_setting() == "fused"
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(MergeError, match="SELMERGE_KERNELS='fast'.*auto, torch, fused"):
        kernel_setting()
    with pytest.raises(MergeError, match="auto, torch, fused"):
        use_kernels("numba").__enter__()


def test_fused_without_numba_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(dispatch, "find_spec", lambda name: None if name == "numba" else real(name))
    tensors = [torch.randn(10) for _ in range(2)]
    ctx = ChunkContext(KeyedRandom(0), "w", 0)
    with use_kernels("auto"):  # quietly the torch kernels
        assert fused_merge_chunk(ParameterSelection(), ctx, tensors, None, torch.empty(10)) is None
    with use_kernels("fused"), pytest.raises(MergeError, match="pip install numba"):
        fused_merge_chunk(ParameterSelection(), ctx, tensors, None, torch.empty(10))


def test_the_fused_kernels_use_torchs_thread_count():
    import numba

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        replicas, base = replicas_off_base(3, 100, torch.float32, 0.5, seed=0)
        _fused(ParameterSelection(), ChunkContext(KeyedRandom(0), "w", 0), replicas, base)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_draw_spec_names_one_key_per_candidate_when_draws_are_not_shared():
    ctx = ChunkContext(KeyedRandom(0), "w", 3)
    spec = DrawSpec.of(ParameterSelection(resample=2), ctx, num_replicas=20)
    assert spec.keys == tuple(ctx.rng.key("w", j) for j in range(3))
    assert spec.thresholds == tuple(ParameterSelection().thresholds(20))


def test_a_backend_that_fails_to_import_leaves_auto_on_the_torch_kernels(monkeypatch):
    """An installed numba that cannot be imported (e.g. built for another numpy): ``auto``
    warns once and merges with the torch kernels; ``fused`` names the import error."""
    name = f"{dispatch.__package__}._unloadable_kernels"
    monkeypatch.setitem(dispatch._BACKENDS, "cpu", ("_unloadable_kernels", "numpy"))
    monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    monkeypatch.setattr(dispatch, "_unimportable", {})
    replicas, base = replicas_off_base(3, 5000, torch.bfloat16, 0.5, seed=0)
    states = [{"w": r} for r in replicas]
    method = ParameterSelection(resample=1)
    with use_kernels("torch"):
        want = merge_state_dicts(states, method=method, base={"w": base})
    with use_kernels("auto"), dispatch.merge_size(1 << 40):
        with pytest.warns(RuntimeWarning, match="importing numpy failed.*torch kernels"):
            got = merge_state_dicts(states, method=method, base={"w": base})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tried once: no second warning
            assert dispatch.fused_backend(method, torch.bfloat16, "cpu") is None
    assert torch.equal(got["w"], want["w"])
    with (
        use_kernels("fused"),
        pytest.raises(MergeError, match="cannot be loaded: ModuleNotFoundError"),
    ):
        merge_state_dicts(states, method=method, base={"w": base})
