"""TIES: per-tensor magnitude trim, sign election, disjoint mean or disjoint selection."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_method_references import assert_matches_reference

from lightning_selmerge.merging import (
    KeyedRandom,
    MergeError,
    iter_merged_chunks,
    merge_state_dicts,
)
from lightning_selmerge.merging.methods import TiesMerging, build_method
from lightning_selmerge.merging.methods.magnitude_trim import (
    kept,
    magnitude_cut,
    reference_kept,
    trim_count,
)


def replicas_around(base, k, seed=0, step=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        noise = torch.randn(base.shape, generator=gen, dtype=torch.float64)
        if step is not None:  # coarse steps: many equal magnitudes at the trim's cut
            noise = (noise / step).round() * step
        out.append((base.double() + noise).to(base.dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "method",
    [
        TiesMerging(),
        TiesMerging(density=0.5, weights=[1.0, 2.0, 0.5, 1.0], scale=0.7),
        TiesMerging(density=1.0),
        TiesMerging(combine="selection"),
        TiesMerging(density=0.35, weights=[0.0, 2.0, 1.0, 1.0], combine="selection"),
    ],
)
@pytest.mark.parametrize("chunk_numel", [1, 29, 4096])
def test_ties_matches_its_reference(dtype, method, chunk_numel):
    base = torch.randn(20, 15, generator=torch.Generator().manual_seed(2)).to(dtype)
    replicas = replicas_around(base, 4, step=0.25)
    assert_matches_reference(method, base, replicas, 7, chunk_numel)


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 400),
    density=st.floats(0.001, 1.0),
    step=st.sampled_from([None, 0.5, 0.125]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    chunk=st.integers(1, 500),
    seed=st.integers(0, 1000),
)
def test_trim_keeps_the_same_elements_whatever_the_chunk_size(
    numel, density, step, dtype, chunk, seed
):
    """The radix select over chunks keeps exactly the stable sort's top ``k``, ties included."""
    base = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)
    (replica,) = replicas_around(base, 1, seed=seed + 1, step=step)
    expected = reference_kept(replica, base, density)
    assert int(expected.sum()) == trim_count(density, numel)
    cut = magnitude_cut(replica, base, density, chunk)
    masks = []
    for begin in range(0, numel, chunk):
        part = kept(cut, replica[begin : begin + chunk], base[begin : begin + chunk], begin)
        masks.append(
            torch.ones(min(chunk, numel - begin), dtype=torch.bool) if part is None else part
        )
    assert torch.equal(torch.cat(masks), expected)


def test_result_does_not_depend_on_chunk_size_or_rank_split():
    base = torch.randn(3000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    replicas = replicas_around(base, 3, step=0.25)
    inputs = [{"w": r} for r in replicas]
    for method in (TiesMerging(density=0.3), TiesMerging(density=0.3, combine="selection")):
        results = [
            merge_state_dicts(inputs, base={"w": base}, method=method, seed=5, chunk_numel=c)["w"]
            for c in (1 << 20, 1000, 7)
        ]
        assert all(torch.equal(results[0], r) for r in results[1:])
        # a rank's slice needs the whole tensor's trim: without it, it is refused
        with pytest.raises(MergeError, match="whole tensor"):
            list(
                iter_merged_chunks(
                    "w", [r[100:] for r in replicas], base[100:], method, KeyedRandom(5), offset=100
                )
            )


def test_disjoint_mean_and_selection_by_hand():
    base = torch.zeros(3, dtype=torch.float64)
    replicas = [
        torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64),
        torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64),
        torch.tensor([-5.0, 1.0, 4.0], dtype=torch.float64),
    ]
    inputs = [{"w": r} for r in replicas]
    mean = merge_state_dicts(inputs, base={"w": base}, method=TiesMerging(density=1.0))["w"]
    # signs elected by the sums (-1, -1, 5): agreeing are (2), (0), (0, 2)
    assert mean.tolist() == [-5.0, -3.0, 3.0]
    for seed in range(20):
        method = TiesMerging(density=1.0, combine="selection")
        chosen = merge_state_dicts(inputs, base={"w": base}, method=method, seed=seed)["w"]
        assert chosen[0] == -5.0 and chosen[1] == -3.0 and chosen[2] in (2.0, 4.0)


def test_parameters_are_checked():
    with pytest.raises(MergeError, match="density must be in"):
        build_method("ties", {"density": 0.0})
    with pytest.raises(MergeError, match="combine must be one of"):
        build_method("ties", {"combine": "sum"})
    with pytest.raises(MergeError, match="2 weights for 3 replicas"):
        merge_state_dicts(
            [{"w": torch.zeros(2)}] * 3,
            base={"w": torch.zeros(2)},
            method=TiesMerging(weights=[1, 1]),
        )
