"""Every registered merge method's fast kernel against its plain reference (the oracle)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_selmerge.merging import KeyedRandom, merge_state_dicts
from lightning_selmerge.merging.methods import method_class, method_names

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@st.composite
def replica_sets(draw):
    k = draw(st.integers(2, 5))
    numel = draw(st.integers(1, 120))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**31))
    unmoved = draw(st.floats(0.0, 1.0))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(dtype)
    replicas = [
        torch.where(
            torch.rand(numel, generator=gen) < unmoved,
            base,
            (base.double() + torch.randn(numel, generator=gen)).to(dtype),
        )
        for _ in range(k)
    ]
    return base, replicas


def assert_matches_reference(method, base, replicas, seed, chunk_numel, name="w"):
    merged = merge_state_dicts(
        [{name: r} for r in replicas],
        base={name: base},
        method=method,
        seed=seed,
        chunk_numel=chunk_numel,
    )[name]
    expected = method.reference(name, replicas, base, KeyedRandom(seed))
    assert merged.dtype == expected.dtype and merged.shape == expected.shape
    if method.exact_reference:
        assert torch.equal(merged, expected), (merged - expected).abs().max()
    else:
        torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("name", method_names())
@settings(max_examples=25, deadline=None)
@given(data=replica_sets(), seed=st.integers(0, 1000), chunk=st.integers(1, 64))
def test_every_method_with_defaults_matches_its_reference(name, data, seed, chunk):
    base, replicas = data
    assert_matches_reference(method_class(name)(), base, replicas, seed, chunk)


@pytest.mark.parametrize("name", method_names())
def test_every_method_declares_documented_parameters(name):
    parameters = method_class(name).parameters()
    assert all(p.help for p in parameters), parameters
    assert method_class(name).name == name


@pytest.mark.parametrize("k", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("resample", [0, 2, 5])
@pytest.mark.parametrize("skewed", [False, True])
def test_selection_candidates_follow_the_documented_draws(k, resample, skewed):
    """The library's candidate sequence against tests/reference_merge.py's independent one."""
    from reference_merge import candidate

    from lightning_selmerge.merging import ParameterSelection
    from lightning_selmerge.merging.methods import candidates_at

    probabilities = [i + 1.0 for i in range(k)] if skewed else None
    if probabilities:
        probabilities = [p / sum(probabilities) for p in probabilities]
    method = ParameterSelection(probabilities=probabilities, resample=resample)
    rng = KeyedRandom(5)
    offsets = torch.tensor([0, 1, 7, 8, 9, 1000, 123457])
    got = candidates_at(method, rng, "layer.w", offsets, k)
    expected = [
        [candidate(rng, "layer.w", int(i), j, k, probabilities, resample) for i in offsets]
        for j in range(resample + 1)
    ]
    assert got.tolist() == expected
