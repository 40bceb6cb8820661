"""The streaming merge's fused states (numba) give the torch states' bits and errors."""

from __future__ import annotations

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
    merge_state_dicts,
)
from lightning_selmerge.merging.finite import check_finite
from lightning_selmerge.merging.kernels import numba_cpu, use_kernels
from lightning_selmerge.merging.kernels.streaming import (
    FusedCandidateState,
    FusedRunningSum,
    fused_streaming_state,
)
from lightning_selmerge.merging.methods.base import StreamTensor
from lightning_selmerge.merging.methods.selection_candidates import selection_candidates
from lightning_selmerge.merging.streaming import merge_state_dicts_streaming
from lightning_selmerge.merging.streaming_files import merge_checkpoints_streaming

FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _raise_nonfinite(piece, position, start):
    """What the drivers' check does: :class:`NonFiniteError` naming the replica and element."""
    check_finite("layer.weight", [piece], [f"replica {position}"], start, [position])


def _tensor(replicas, base, seed, chunk_numel, name="layer.weight"):
    return StreamTensor(
        name=name,
        draw_name=name,
        dtype=replicas[0].dtype,
        numel=replicas[0].numel(),
        num_replicas=len(replicas),
        rng=KeyedRandom(seed),
        base=base,
        chunk_numel=chunk_numel,
        check_finite=_raise_nonfinite,
    )


def _stream(method, tensor, replicas, setting):
    """The merge of ``replicas`` by ``method``'s torch state, or by the fused one."""
    with use_kernels(setting):
        state = fused_streaming_state(method, tensor)
    if setting == "torch":
        assert state is None
        state = method.streaming().start(tensor)
    else:
        assert isinstance(state, FusedCandidateState | FusedRunningSum)
    for position, replica in enumerate(replicas):
        state.add(position, replica)
    return state.finish()


@settings(max_examples=50, deadline=None)
@given(
    num_replicas=st.one_of(st.integers(2, 20), st.integers(21, 63)),
    resample=st.integers(0, 4),
    dtype=st.sampled_from(FLOAT_DTYPES),
    numel=st.integers(1, 3 * numba_cpu.BLOCK + 5),
    chunk_numel=st.sampled_from([7, 1000, 1 << 20]),
    moved_share=st.sampled_from([0.0, 0.3, 1.0]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_fused_selection_state_gives_the_torch_states_bits(
    num_replicas, resample, dtype, numel, chunk_numel, moved_share, weighted, seed
):
    probabilities = None
    if weighted:
        raw = torch.rand(num_replicas, generator=torch.Generator().manual_seed(seed)) + 0.05
        probabilities = (raw / raw.sum()).tolist()
        probabilities[-1] = 1.0 - sum(probabilities[:-1])
    method = ParameterSelection(probabilities=probabilities, resample=resample)
    replicas, base = replicas_off_base(num_replicas, numel, dtype, moved_share, seed)
    tensor = _tensor(replicas, base, seed, chunk_numel)
    expected = _stream(method, tensor, replicas, "torch")
    merged = _stream(method, tensor, replicas, "fused")
    assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))


@settings(max_examples=30, deadline=None)
@given(
    num_replicas=st.integers(2, 20),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    numel=st.integers(1, 2 * numba_cpu.BLOCK + 3),
    chunk_numel=st.sampled_from([5, 1 << 20]),
    scale=st.sampled_from([1e-6, 1.0, 1e4, 1e30]),  # in float16: subnormal, ..., Inf
    seed=st.integers(0, 2**16),
)
def test_a_fused_running_sum_gives_the_torch_states_bits(
    num_replicas, dtype, numel, chunk_numel, scale, seed
):
    generator = torch.Generator().manual_seed(seed)
    replicas = [
        (torch.randn(numel, generator=generator) * scale).to(dtype) for _ in range(num_replicas)
    ]
    tensor = _tensor(replicas, None, seed, chunk_numel)
    method = WeightedAverage()
    try:
        expected = _stream(method, tensor, replicas, "torch")
    except MergeError as error:  # an overflow: the fused state says the same
        with pytest.raises(MergeError) as raised:
            _stream(method, tensor, replicas, "fused")
        assert str(raised.value) == str(error)
        return
    merged = _stream(method, tensor, replicas, "fused")
    assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_fused_running_sum_starts_from_the_first_replica_with_zeros_bits(dtype):
    """The fused sum is not zeroed: the first replica sets it. Signed zeros show the difference
    between setting and adding to zeros (-0 + 0 is +0), so the torch state's bits are the judge."""
    signed = torch.tensor([-0.0, -0.0, 0.0, -0.0, 1.0, -2.0])
    replicas = [signed.to(dtype), (-signed).to(dtype).mul(0), signed.to(dtype)]
    replicas[1][4] = -1.0
    tensor = _tensor(replicas, None, 0, 4)
    expected = _stream(WeightedAverage(), tensor, replicas, "torch")
    merged = _stream(WeightedAverage(), tensor, replicas, "fused")
    assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))
    assert not torch.signbit(merged[:4]).any()  # no -0: the sum started from +0


@pytest.mark.parametrize(("num_replicas", "resample"), [(4, 0), (4, 1), (4, 4), (20, 2), (3, 1)])
def test_the_fused_candidates_are_the_plain_draws(num_replicas, resample):
    method = ParameterSelection(resample=resample)
    replicas, base = replicas_off_base(
        num_replicas, 2 * numba_cpu.BLOCK + 9, torch.bfloat16, 0.5, 1
    )
    tensor = _tensor(replicas, base, seed=5, chunk_numel=1000)
    with use_kernels("fused"):
        state = fused_streaming_state(method, tensor)
    expected = selection_candidates(method, tensor.context(0), tensor.numel, num_replicas)
    assert torch.equal(state.candidates, expected)


@pytest.mark.parametrize("method", [ParameterSelection(), ParameterSelection(resample=2)])
def test_a_fused_selection_state_names_the_first_bad_chunk_of_the_replica(method):
    replicas, base = replicas_off_base(3, 3000, torch.float32, 0.5, seed=0)
    replicas[1][2500] = float("inf")
    replicas[1][2900] = float("nan")
    tensor = _tensor(replicas, base, seed=0, chunk_numel=1000)
    messages = []
    for setting in ("torch", "fused"):
        with pytest.raises(NonFiniteError) as raised:
            _stream(method, tensor, replicas, setting)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert "replica 1" in messages[0] and "2500" in messages[0]


def test_states_no_fused_kernel_covers_stay_on_torch():
    replicas, base = replicas_off_base(3, 10, torch.float32, 0.5, seed=0)
    tensor = _tensor(replicas, base, seed=0, chunk_numel=4)
    with use_kernels("fused"):
        assert fused_streaming_state(WeightedAverage(weights=[1.0, 2.0, 3.0]), tensor) is None
        doubles = _tensor([r.double() for r in replicas], base.double(), seed=0, chunk_numel=4)
        assert fused_streaming_state(WeightedAverage(), doubles) is None
        eights = [r.to(torch.float8_e4m3fn) for r in replicas]
        assert fused_streaming_state(ParameterSelection(), _tensor(eights, None, 0, 4)) is None
        no_base = _tensor(replicas, None, seed=0, chunk_numel=4)
        assert fused_streaming_state(ParameterSelection(resample=1), no_base) is None
        assert isinstance(fused_streaming_state(ParameterSelection(), no_base), FusedCandidateState)
    with use_kernels("torch"):
        assert fused_streaming_state(ParameterSelection(), tensor) is None


def _states(num_replicas=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(300, 16, generator=generator).bfloat16(),
        "norm.weight": torch.randn(16, generator=generator),
        "steps": torch.arange(3),
    }
    replicas = []
    for _ in range(num_replicas):
        state = {}
        for name, tensor in base.items():
            if not tensor.is_floating_point():
                state[name] = tensor.clone()
                continue
            noise = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
            keep = torch.rand(tensor.shape, generator=generator) < 0.5
            state[name] = torch.where(keep, tensor, noise)
        replicas.append(state)
    return base, replicas


@pytest.mark.parametrize(
    "method",
    [ParameterSelection(), ParameterSelection(resample=3), WeightedAverage()],
    ids=["selection", "resample3", "mean"],
)
def test_the_streaming_drivers_give_the_all_at_once_bits_on_either_kernels(method, tmp_path):
    from safetensors.torch import load_file, save_file

    base, replicas = _states(num_replicas=5)
    with use_kernels("torch"):
        expected = merge_state_dicts(replicas, base=base, method=method, seed=4)
    paths = []
    for k, state in enumerate([base, *replicas]):
        paths.append(tmp_path / f"{k}.safetensors")
        save_file(state, paths[-1])
    for setting in ("torch", "fused"):
        with use_kernels(setting):
            streamed = merge_state_dicts_streaming(
                replicas, base=base, method=method, seed=4, chunk_numel=1000, window_bytes=4096
            )
            out = merge_checkpoints_streaming(
                paths[1:], tmp_path / setting, base=paths[0], method=method, seed=4
            )
        from_files = {}
        for path in sorted(out.glob("*.safetensors")):
            from_files.update(load_file(path))
        for name in base:
            assert torch.equal(streamed[name], expected[name]), (setting, name)
            assert torch.equal(from_files[name], expected[name]), (setting, name)


@pytest.mark.parametrize("method", [ParameterSelection(resample=1), WeightedAverage()])
def test_a_fused_streaming_merge_names_the_replica_that_holds_nan(method):
    base, replicas = _states()
    replicas[2]["norm.weight"][7] = float("nan")
    messages = []
    for setting in ("torch", "fused"):
        with use_kernels(setting), pytest.raises(NonFiniteError, match="replica 2") as raised:
            merge_state_dicts_streaming(replicas, base=base, method=method)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    dropped = {}
    for setting in ("torch", "fused"):
        with use_kernels(setting), pytest.warns(UserWarning, match="dropped replica 2"):
            dropped[setting] = merge_state_dicts_streaming(
                replicas, base=base, method=method, nonfinite="drop"
            )
    for name in base:
        assert torch.equal(dropped["torch"][name], dropped["fused"][name])
