"""The streaming merge (replicas fed one at a time) equals the all-at-once merge bit for bit."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_selmerge.merging import (
    Dare,
    MergeError,
    MergeRule,
    NonFiniteError,
    ParameterSelection,
    TaskArithmetic,
    WeightedAverage,
    merge_state_dicts,
)
from lightning_selmerge.merging.safetensors_io import TensorInfo
from lightning_selmerge.merging.streaming import StreamingMerge, merge_state_dicts_streaming

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def make_states(k, dtype, seed=0, unmoved=0.5, numel=257):
    """K replicas of a small model with a base: tied, integer, empty and 0-d tensors included."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(dtype)

    base = {"emb": randn(numel // 8, 8), "fc.w": randn(numel), "fc.b": randn(3), "s": randn()}
    replicas = []
    for _ in range(k):
        state = {}
        for name, value in base.items():
            keep = torch.rand(value.shape, generator=gen) < unmoved
            state[name] = torch.where(keep, value, randn(*value.shape))
        state["head"] = state["emb"]  # tied
        state["steps"] = torch.arange(4)  # an integer buffer: copied
        state["empty"] = torch.zeros(0, dtype=dtype)
        replicas.append(state)
    return {
        **base,
        "head": base["emb"],
        "steps": torch.arange(4),
        "empty": torch.zeros(0, dtype=dtype),
    }, replicas


def assert_same_bits(got, expected):
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        if tensor.is_floating_point():
            assert torch.equal(
                got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            ), name
        else:
            assert torch.equal(got[name], tensor), name


def assert_streaming_matches(replicas, base, method, seed, chunk, stream_chunk, window):
    """The streaming merge (replicas fed through a callable) equals the all-at-once merge, each
    with its own chunk size."""
    expected = merge_state_dicts(replicas, method=method, base=base, seed=seed, chunk_numel=chunk)
    got = merge_state_dicts_streaming(
        lambda i: replicas[i],
        num_replicas=len(replicas),
        method=method,
        base=base,
        seed=seed,
        chunk_numel=stream_chunk,
        window_bytes=window,
    )
    assert_same_bits(got, expected)


def skewed(k):
    raw = [1 + (i * 7) % 5 for i in range(k)]
    return [w / sum(raw) for w in raw]


METHODS = [
    ("average", lambda k: WeightedAverage()),
    ("weighted", lambda k: WeightedAverage(weights=[0.5 + i for i in range(k)])),
    ("selection", lambda k: ParameterSelection()),
    ("skewed", lambda k: ParameterSelection(probabilities=skewed(k))),
    ("resample1", lambda k: ParameterSelection(resample=1)),
    ("resample3", lambda k: ParameterSelection(resample=3)),
    ("skewed_resample2", lambda k: ParameterSelection(probabilities=skewed(k), resample=2)),
    ("task_arithmetic", lambda k: TaskArithmetic(scale=0.7)),
    ("task_arithmetic_w", lambda k: TaskArithmetic(weights=[1 - 0.4 * i for i in range(k)])),
    ("task_arithmetic_sel", lambda k: TaskArithmetic(weights=skewed(k), combine="selection")),
    ("dare", lambda k: Dare(drop_rate=0.3)),
    ("dare_w_scaled", lambda k: Dare(weights=skewed(k), scale=1.5)),
    ("dare_sel", lambda k: Dare(drop_rate=0.6, combine="selection")),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 4, 8, 9, 13, 16])
@pytest.mark.parametrize("label,make", METHODS, ids=[m[0] for m in METHODS])
def test_streaming_equals_all_at_once(label, make, k, dtype):
    base, replicas = make_states(k, dtype, seed=k)
    method = make(k)
    expected = merge_state_dicts(replicas, method=method, base=base, seed=7, chunk_numel=64)
    got = merge_state_dicts_streaming(replicas, method=method, base=base, seed=7, chunk_numel=64)
    assert_same_bits(got, expected)
    assert got["head"] is got["emb"]  # tied tensors stay tied


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 20),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
    unmoved=st.floats(0.0, 1.0),
    resample=st.integers(0, 4),
    uniform=st.booleans(),
    average=st.booleans(),
    chunk=st.integers(1, 300),
    stream_chunk=st.integers(1, 300),
    window=st.integers(1, 10_000),
)
def test_streaming_equals_all_at_once_property(
    k, dtype, seed, unmoved, resample, uniform, average, chunk, stream_chunk, window
):
    """Any chunk sizes (the two merges' differ), any window, K up to 20."""
    base, replicas = make_states(k, dtype, seed=seed % 1000, unmoved=unmoved, numel=120)
    if average:
        method = WeightedAverage(None if uniform else [0.25 + (i % 3) for i in range(k)])
    else:
        method = ParameterSelection(None if uniform else skewed(k), resample=resample)
    assert_streaming_matches(replicas, base, method, seed, chunk, stream_chunk, window)


def test_rules_and_float8_follow_the_all_at_once_merge():
    base, replicas = make_states(5, torch.float32, seed=1)
    for state in [base, *replicas]:
        state["f8"] = state["fc.w"].to(torch.float8_e4m3fn)
    rules = [MergeRule("fc", WeightedAverage([1, 2, 3, 4, 5])), MergeRule("f8", WeightedAverage())]
    method = ParameterSelection(resample=2)
    expected = merge_state_dicts(replicas, method=method, base=base, rules=rules, seed=2)
    got = merge_state_dicts_streaming(replicas, method=method, base=base, rules=rules, seed=2)
    assert_same_bits(got, expected)


TASK_VECTOR_METHODS = [
    TaskArithmetic(),
    TaskArithmetic(combine="selection"),
    Dare(weights=[1, 2, 3, 4], scale=0.5),
    Dare(combine="selection"),
]


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(2, 20),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
    index=st.integers(0, len(TASK_VECTOR_METHODS) - 1),
    chunk=st.integers(1, 300),
    stream_chunk=st.integers(1, 300),
    window=st.integers(1, 10_000),
)
def test_task_vector_streaming_equals_all_at_once_property(
    k, dtype, seed, index, chunk, stream_chunk, window
):
    base, replicas = make_states(k, dtype, seed=seed % 1000, numel=120)
    method = TASK_VECTOR_METHODS[index]
    if method.weights is not None:
        method = replace(method, weights=[1 + i % 4 for i in range(k)])
    assert_streaming_matches(replicas, base, method, seed, chunk, stream_chunk, window)


@pytest.mark.parametrize(
    "method",
    [ParameterSelection(), WeightedAverage(), TaskArithmetic(), Dare(combine="selection")],
    ids=repr,
)
def test_nonfinite_replica_is_named_or_dropped(method):
    base, replicas = make_states(4, torch.float32, seed=3)
    replicas[2]["fc.w"] = replicas[2]["fc.w"].clone()
    replicas[2]["fc.w"][17] = float("nan")
    with pytest.raises(NonFiniteError, match="replica 2") as info:
        merge_state_dicts_streaming(replicas, method=method, base=base)
    assert info.value.replicas == (2,) and info.value.tensor == "fc.w"
    with pytest.warns(UserWarning, match="dropped replica 2"):
        expected = merge_state_dicts(replicas, method=method, base=base, nonfinite="drop")
    with pytest.warns(UserWarning, match="dropped replica 2"):
        got = merge_state_dicts_streaming(replicas, method=method, base=base, nonfinite="drop")
    assert_same_bits(got, expected)


def test_average_overflow_is_reported_as_such():
    replicas = [{"w": torch.full((4,), 3e38)} for _ in range(2)]
    with pytest.raises(MergeError, match="overflowed") as info:
        merge_state_dicts_streaming(replicas, method=WeightedAverage([1.0, 2.0]))
    assert not isinstance(info.value, NonFiniteError)


def test_bad_inputs_are_refused():
    _, replicas = make_states(3, torch.float32)
    replicas[1]["steps"] = torch.arange(4) + 1
    with pytest.raises(MergeError, match="non-float tensor 'steps'.*replica 0 and replica 1"):
        merge_state_dicts_streaming(replicas)
    _, replicas = make_states(3, torch.float32)
    replicas[2]["fc.b"] = torch.zeros(4)
    with pytest.raises(MergeError, match="'fc.b'.*replica 2"):
        merge_state_dicts_streaming(replicas)
    _, replicas = make_states(3, torch.float32)
    del replicas[1]["fc.b"]
    with pytest.raises(MergeError, match="replica 1 does not have the same tensors"):
        merge_state_dicts_streaming(replicas)
    with pytest.raises(MergeError, match="needs the base"):
        merge_state_dicts_streaming(
            make_states(3, torch.float32)[1], method=ParameterSelection(resample=1)
        )


def test_replicas_are_fed_in_order_and_all_of_them():
    merge = StreamingMerge([("w", TensorInfo(torch.float32, (3,)))], num_replicas=2)
    merge.feed({"w": torch.zeros(3)})
    with pytest.raises(MergeError, match="1 of 2 replicas were fed"):
        merge.result()
    merge.feed({"w": torch.ones(3)})
    with pytest.raises(MergeError, match="more than 2 replicas"):
        merge.feed({"w": torch.ones(3)})


@pytest.mark.parametrize("kernels", ["torch", "fused"])
def test_the_most_resamples_give_the_all_at_once_bits(kernels):
    """resample = 254, the limit: candidate 0's streaming priority (resample + 1) still fits a
    byte (at 255 it wrapped to 0, and 255 is refused now)."""
    from lightning_selmerge.merging.kernels import use_kernels
    from lightning_selmerge.merging.methods import MAX_RESAMPLE

    base, replicas = make_states(3, torch.float32, unmoved=0.95, numel=2000)
    method = ParameterSelection(resample=MAX_RESAMPLE)
    with use_kernels(kernels):
        streamed = merge_state_dicts_streaming(replicas, method=method, base=base, seed=1)
    assert_same_bits(streamed, merge_state_dicts(replicas, method=method, base=base, seed=1))


def test_a_rule_keeps_one_namespace_under_a_draw_prefix():
    """Llama-style files already name the backbone model.*: a rule ^model\\. written for them
    must not also match lm_head through the draw prefix (model. + lm_head.weight), while a rule
    that matches none of the files' names is read as one for the in-process names."""
    gen = torch.Generator().manual_seed(0)
    states = [
        {
            "model.layers.0.w": torch.randn(8, generator=gen),
            "lm_head.weight": torch.randn(8, generator=gen),
        }
        for _ in range(3)
    ]
    backbone = MergeRule(r"^model\.", WeightedAverage())
    kwargs = {"method": ParameterSelection(), "seed": 1}
    plain = merge_state_dicts_streaming(states, rules=[backbone], **kwargs)
    prefixed = merge_state_dicts_streaming(states, rules=[backbone], draw_prefix="model.", **kwargs)
    mean = sum(s["model.layers.0.w"] for s in states) / 3
    heads = torch.stack([s["lm_head.weight"] for s in states])
    for merged in (plain, prefixed):
        torch.testing.assert_close(merged["model.layers.0.w"], mean)
        assert (merged["lm_head.weight"] == heads).any(0).all()  # selected, not averaged
    head = MergeRule(r"^model\.lm_head", WeightedAverage())  # an in-process name
    merged = merge_state_dicts_streaming(states, rules=[head], draw_prefix="model.", **kwargs)
    torch.testing.assert_close(
        merged["lm_head.weight"], sum(s["lm_head.weight"] for s in states) / 3
    )
