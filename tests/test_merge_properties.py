"""Property-based tests of the merge core (hypothesis)."""

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_merge import candidate_matrix

from lightning_selmerge.merging import (
    KeyedRandom,
    MergeMethod,
    ParameterSelection,
    WeightedAverage,
    iter_merged_chunks,
    merge_state_dicts,
)

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@st.composite
def replica_sets(draw):
    k = draw(st.integers(2, 6))
    numel = draw(st.integers(1, 300))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**31))
    unmoved = draw(st.floats(0.0, 1.0))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(dtype)
    replicas = [
        torch.where(
            torch.rand(numel, generator=gen) < unmoved,
            base,
            torch.randn(numel, generator=gen).to(dtype),
        )
        for _ in range(k)
    ]
    return base, replicas


def shares(k: int) -> st.SearchStrategy[list[float]]:
    """K non-negative numbers summing to 1 (some may be 0)."""
    return (
        st.lists(st.integers(0, 100), min_size=k, max_size=k)
        .filter(lambda w: sum(w) > 0)
        .map(lambda w: [x / sum(w) for x in w])
    )


def selections(k: int) -> st.SearchStrategy[ParameterSelection]:
    return st.builds(ParameterSelection, st.none() | shares(k), st.integers(0, 3))


def methods(k: int) -> st.SearchStrategy[MergeMethod]:
    weights = st.lists(st.floats(0.1, 10.0), min_size=k, max_size=k)
    return selections(k) | st.builds(WeightedAverage, st.none() | weights)


@settings(max_examples=60, deadline=None)
@given(replica_sets(), st.data(), st.integers(0, 1000))
def test_selection_elements_each_equal_one_replicas_element(data, draw, seed):
    base, replicas = data
    method = draw.draw(selections(len(replicas)))
    merged = merge_state_dicts(
        [{"w": r} for r in replicas], base={"w": base}, method=method, seed=seed
    )["w"]
    bits = torch.stack([r.view(torch.uint8).view(r.numel(), -1) for r in replicas])
    out = merged.view(torch.uint8).view(merged.numel(), -1)
    assert (bits == out).all(-1).any(0).all()


@settings(max_examples=40, deadline=None)
@given(replica_sets(), st.lists(st.floats(0.1, 10.0), min_size=6, max_size=6))
def test_average_of_identical_replicas_is_the_replica(data, weights):
    base, replicas = data
    copies = [{"w": base.clone()} for _ in replicas]
    merged = merge_state_dicts(copies, method=WeightedAverage(weights[: len(replicas)]))["w"]
    torch.testing.assert_close(merged, base)
    if base.dtype in (torch.bfloat16, torch.float16):
        # equal weights on identical values are exact after rounding to the input dtype
        equal = merge_state_dicts(copies, method=WeightedAverage())["w"]
        assert torch.equal(equal, base)


@settings(max_examples=60, deadline=None)
@given(replica_sets(), st.integers(1, 4), st.integers(0, 1000))
def test_resample_never_returns_unmoved_when_a_candidate_moved(data, resample, seed):
    base, replicas = data
    k = len(replicas)
    method = ParameterSelection(resample=resample)
    merged = merge_state_dicts(
        [{"w": r} for r in replicas], base={"w": base}, method=method, seed=seed
    )["w"]
    n = base.numel()
    candidates = candidate_matrix(seed, "w", n, k, resample)
    as_int = lambda t: t.view(torch.uint8).view(n, -1)  # noqa: E731
    moved = torch.stack([(as_int(r) != as_int(base)).any(-1) for r in replicas])
    some_candidate_moved = torch.gather(moved, 0, candidates).any(0)
    merged_moved = (as_int(merged) != as_int(base)).any(-1)
    assert merged_moved[some_candidate_moved].all()


@settings(max_examples=40, deadline=None)
@given(
    replica_sets(),
    st.data(),
    st.lists(st.integers(0, 300), max_size=4),
    st.integers(1, 64),
    st.integers(1, 64),
)
def test_merge_is_invariant_to_chunk_size_and_rank_splits(data, draw, cuts, chunk, rank_chunk):
    """Any chunk size, and any split of the flat tensor into ranks' slices merged on their own
    with ``iter_merged_chunks(offset=...)`` and concatenated, give the whole merge's bits."""
    base, replicas = data
    method = draw.draw(methods(len(replicas)))
    n = base.numel()
    inputs = [{"w": r} for r in replicas]
    whole = merge_state_dicts(inputs, base={"w": base}, method=method, seed=1)["w"]
    chunked = merge_state_dicts(inputs, base={"w": base}, method=method, seed=1, chunk_numel=chunk)[
        "w"
    ]
    assert torch.equal(whole.view(torch.uint8), chunked.view(torch.uint8))
    bounds = sorted({0, n, *(c % (n + 1) for c in cuts)})
    rng = KeyedRandom(1)
    parts = [
        chunk_out
        for a, b in itertools.pairwise(bounds)
        for chunk_out in iter_merged_chunks(
            "w",
            [r[a:b] for r in replicas],
            base[a:b],
            method,
            rng,
            chunk_numel=rank_chunk,
            offset=a,
        )
    ]
    assert torch.equal(torch.cat(parts).view(torch.uint8), whole.view(torch.uint8))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**40),
    st.integers(0, 400_000),
    st.integers(0, 0xFFFF),
    st.lists(st.integers(0, 400_000), max_size=3),
)
def test_blocked_hash_matches_the_per_element_definition(start, numel, keep, cuts):
    """bits16 hashes in cache-sized blocks; any range and any split give the per-offset draws."""
    rng = KeyedRandom(7)
    whole = rng.bits16("layer.w", 0, start, numel)
    assert whole.shape == (numel,)
    picks = torch.unique(torch.randint(0, max(numel, 1), (64,))) if numel else torch.tensor([])
    picks = torch.cat([picks.long(), torch.tensor([0, numel - 1]).clamp(min=0)])[: numel + 64]
    if numel:
        expected = rng.uniform16_at("layer.w", 0, picks + start)
        assert torch.equal(whole[picks].to(torch.int32) & 0xFFFF, expected)
    bounds = sorted({0, numel, *(c % (numel + 1) for c in cuts)})
    parts = [rng.bits16("layer.w", 0, start + a, b - a) for a, b in itertools.pairwise(bounds)]
    assert torch.equal(torch.cat([whole[:0], *parts]), whole)
    masked = rng.masked_lanes("layer.w", 0, start, numel, keep)
    assert torch.equal(masked, whole & (keep - (1 << 16) if keep >= 1 << 15 else keep))
