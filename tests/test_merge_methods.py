import itertools
import math
import threading

import pytest
import torch
from reference_merge import candidate, candidate_matrix

from lightning_selmerge.merging import (
    KeyedRandom,
    MergeError,
    ParameterSelection,
    WeightedAverage,
    merge_state_dicts,
)
from lightning_selmerge.merging import scratch as scratch_module
from lightning_selmerge.merging.methods import ChunkContext
from lightning_selmerge.merging.methods import selection_kernel as methods_module

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_replicas(k, shape, dtype, seed=0, unmoved=0.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    replicas = []
    for _ in range(k):
        moved = base + torch.randn(shape, generator=gen).to(dtype)
        keep = torch.rand(shape, generator=gen) < unmoved
        replicas.append(torch.where(keep, base, moved))
    return base, replicas


def reference_selection(name, replicas, base, seed, probabilities=None, resample=0):
    """Element by element, the documented definition: draw, re-draw while unmoved."""
    rng = KeyedRandom(seed)
    flat = [r.reshape(-1) for r in replicas]
    flat_base = base.reshape(-1) if base is not None else None
    out = torch.empty_like(flat[0])
    for i in range(flat[0].numel()):
        for stream in range(resample + 1):
            choice = candidate(rng, name, i, stream, len(flat), probabilities, resample)
            if flat_base is None or not torch.equal(
                flat[choice][i].view(-1).view(torch.uint8), flat_base[i].view(-1).view(torch.uint8)
            ):
                break
        out[i] = flat[choice][i]
    return out.view(replicas[0].shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_weighted_average_matches_naive_reference(dtype, k):
    _base, replicas = make_replicas(k, (7, 5), dtype)
    weights = [0.5 + i for i in range(k)]
    merged = merge_state_dicts(
        [{"w": r} for r in replicas], method=WeightedAverage(weights), chunk_numel=4
    )["w"]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = sum(w * r.to(compute) for w, r in zip(weights, replicas)) / sum(weights)
    assert merged.dtype == dtype
    # one rounding to the output dtype, up to one float32 ulp from fused multiply-add
    torch.testing.assert_close(merged, expected.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0]])
def test_weighted_average_of_float8(dtype, weights):
    """float8 takes no part in type promotion: the average widens it to float32 first."""
    gen = torch.Generator().manual_seed(0)
    replicas = [(torch.randn(40, generator=gen) * (k + 1)).to(dtype) for k in range(3)]
    merged = merge_state_dicts(
        [{"w": r} for r in replicas], method=WeightedAverage(weights), chunk_numel=7
    )["w"]
    w = weights or [1.0, 1.0, 1.0]
    expected = (sum(wk * r.float() for wk, r in zip(w, replicas)) / sum(w)).to(dtype)
    assert merged.dtype == dtype
    assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 15])
@pytest.mark.parametrize("probabilities", [None, "skewed"])
def test_selection_matches_naive_reference(dtype, k, probabilities):
    probs = None if probabilities is None else [i + 1 for i in range(k)]
    probs = None if probs is None else [p / sum(probs) for p in probs]
    _, replicas = make_replicas(k, (6, 9), dtype, seed=k)
    merged = merge_state_dicts(
        [{"enc.w": r} for r in replicas], method=ParameterSelection(probs), seed=11, chunk_numel=5
    )["enc.w"]
    expected = reference_selection("enc.w", replicas, None, 11, probs)
    assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("resample", [1, 2, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_with_resample_matches_naive_reference(k, resample, dtype):
    base, replicas = make_replicas(k, (8, 8), dtype, seed=resample, unmoved=0.6)
    sds = [{"w": r} for r in replicas]
    merged = merge_state_dicts(
        sds, base={"w": base}, method=ParameterSelection(resample=resample), seed=5, chunk_numel=9
    )["w"]
    expected = reference_selection("w", replicas, base, 5, resample=resample)
    assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("k", [2, 3, 4, 7, 8, 15, 31])
def test_selection_frequencies_are_one_over_k(k):
    n = 200_000
    replicas = [{"w": torch.full((n,), float(i))} for i in range(k)]
    merged = merge_state_dicts(replicas, method=ParameterSelection(), seed=1)["w"]
    counts = torch.bincount(merged.long(), minlength=k).double()
    expected = n / k
    sd = math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert torch.all((counts - expected).abs() < 5 * sd), counts


def test_selection_follows_given_probabilities():
    n = 200_000
    probabilities = [0.1, 0.6, 0.3]
    replicas = [{"w": torch.full((n,), float(i))} for i in range(3)]
    merged = merge_state_dicts(replicas, method=ParameterSelection(probabilities), seed=2)["w"]
    counts = torch.bincount(merged.long(), minlength=3).double() / n
    for got, p in zip(counts.tolist(), probabilities):
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_selection_never_picks_a_replica_with_probability_zero():
    replicas = [{"w": torch.full((5000,), float(i))} for i in range(3)]
    merged = merge_state_dicts(replicas, method=ParameterSelection([0.5, 0.0, 0.5]))["w"]
    assert not (merged == 1.0).any()


def test_resample_picks_a_moved_element_whenever_a_candidate_moved():
    k, resample, n = 4, 2, 4000
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(n)
    # replica i moved (value i + 1) at a random 30% of the elements
    replicas = [
        torch.where(torch.rand(n, generator=gen) < 0.3, float(i + 1), 0.0) for i in range(k)
    ]
    method = ParameterSelection(resample=resample)
    merged = merge_state_dicts(
        [{"w": r} for r in replicas], base={"w": base}, method=method, seed=9
    )["w"]
    candidates = candidate_matrix(9, "w", n, k, resample)
    moved = torch.stack([r != 0 for r in replicas])  # [k, n]
    candidate_moved = torch.gather(moved, 0, candidates)  # [resample + 1, n]
    any_candidate_moved = candidate_moved.any(0)
    assert (merged[any_candidate_moved] != 0).all()
    assert (merged[~any_candidate_moved] == 0).all()
    # the first candidate that moved is the one kept
    first = candidate_moved.float().argmax(0)
    kept = candidates.gather(0, first.unsqueeze(0)).squeeze(0)
    assert torch.equal(merged[any_candidate_moved], (kept + 1).float()[any_candidate_moved])
    # and resample really changed something compared with plain selection
    plain = merge_state_dicts([{"w": r} for r in replicas], method=ParameterSelection(), seed=9)
    assert (plain["w"] == 0).sum() > (merged == 0).sum()


def test_resample_zero_equals_plain_selection_and_first_candidate():
    _base, replicas = make_replicas(4, (1000,), torch.bfloat16, unmoved=0.5)
    sds = [{"w": r} for r in replicas]
    plain = merge_state_dicts(sds, method=ParameterSelection(), seed=4)["w"]
    general = merge_state_dicts(sds, method=ParameterSelection([0.25] * 4), seed=4)["w"]
    assert torch.equal(plain.view(torch.int16), general.view(torch.int16))


def test_chunk_context_offsets_reproduce_a_split_tensor():
    """A tensor split across ranks: each part merged with its offset gives the whole merge."""
    base, replicas = make_replicas(3, (1001,), torch.float32, unmoved=0.4)
    rng = KeyedRandom(0)
    method = ParameterSelection(resample=2)
    whole = method.merge_chunk(ChunkContext(rng, "w", 0), replicas, base)
    cut = [0, 17, 500, 1001]
    parts = [
        method.merge_chunk(ChunkContext(rng, "w", a), [r[a:b] for r in replicas], base[a:b])
        for a, b in itertools.pairwise(cut)
    ]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize(
    "method,match",
    [
        (WeightedAverage([1.0]), "1 weights for 2 replicas"),
        (WeightedAverage([1.0, -1.0]), "sum to a positive number"),
        (WeightedAverage([1.0, float("nan")]), "finite"),
        (ParameterSelection([0.5, 0.6]), "sum to 1"),
        (ParameterSelection([1.5, -0.5]), "out of range"),
        (ParameterSelection([1.0]), "1 probabilities for 2 replicas"),
        (ParameterSelection(resample=-1), "resample must be an integer >= 0"),
        (ParameterSelection(resample=255), "resample=255 is above 254"),
        (WeightedAverage([1e308, 1e308]), "overflow when summed"),
        (WeightedAverage([5e-324, 5e-324]), "each must be 0 or at least"),
    ],
)
def test_bad_method_parameters_are_named(method, match):
    replicas = [{"w": torch.zeros(3)}, {"w": torch.ones(3)}]
    with pytest.raises(MergeError, match=match):
        merge_state_dicts(replicas, base=replicas[0], method=method)


def test_fewer_than_two_replicas_is_refused():
    with pytest.raises(MergeError, match="at least 2 replicas"):
        merge_state_dicts([{"w": torch.zeros(3)}])


# (K, resample) pairs the dense one-draw path resolves through a lookup table: both index
# layouts (candidates above the moved mask in 16 bits, and shifted up for wider indices)
TABLE_CASES = [(2, 1), (2, 4), (2, 13), (2, 15), (4, 1), (4, 4), (4, 5), (4, 7)]
TABLE_CASES += [(8, 1), (8, 2), (8, 3)]


def first_moved_candidate(candidates, moved):
    """The definition: the first candidate whose replica moved, else the last (the base's value)."""
    for c in candidates:
        if moved >> c & 1:
            return c
    return candidates[-1]


@pytest.mark.parametrize("k,resample", TABLE_CASES)
def test_resolution_table_entries_follow_the_definition(k, resample):
    table = methods_module._resolution_table(k, resample)
    assert table is not None
    bits = k.bit_length() - 1
    gen = torch.Generator().manual_seed(k * 100 + resample)
    draws = [0, 0xFFFF, *torch.randint(0, 1 << 16, (12_000 >> k,), generator=gen).tolist()]
    indices, expected = [], []
    for u in draws:
        candidates = [(u >> (16 - (j + 1) * bits)) & (k - 1) for j in range(resample + 1)]
        for moved in range(1 << k):
            indices.append(((u & table.keep_mask) << table.shift) | moved)
            expected.append(first_moved_candidate(candidates, moved))
    assert table.values[torch.tensor(indices)].tolist() == expected


def test_no_table_when_it_would_be_too_big():
    assert methods_module._resolution_table(8, 4) is None  # 2**23 entries
    assert methods_module._resolution_table(16, 2) is None


@pytest.mark.parametrize("k,resample", TABLE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_table_path_matches_naive_reference(k, resample, dtype, monkeypatch):
    monkeypatch.setattr(scratch_module, "_BUFFERS", threading.local())  # fresh scratch buffers
    base, replicas = make_replicas(k, (70,), dtype, seed=k + resample, unmoved=0.7)
    # elements 0..9 unmoved in every replica: whatever the candidates, the output is the base
    for r in replicas:
        r[:10] = base[:10]
    sds = [{"w": r} for r in replicas]
    method = ParameterSelection(resample=resample)
    expected = reference_selection("w", replicas, base, 3, resample=resample)
    assert torch.equal(expected[:10].view(torch.uint8), base[:10].view(torch.uint8))
    for chunk_numel in (1, 23, 70):  # one-element chunks: a scratch row stride of 1
        merged = merge_state_dicts(
            sds, base={"w": base}, method=method, seed=3, chunk_numel=chunk_numel
        )["w"]
        assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("k,resample", TABLE_CASES)
def test_table_path_matches_direct_resolution(k, resample, monkeypatch):
    """Bit for bit the same as the direct dense resolution, at scale and across chunk splits."""
    base, replicas = make_replicas(k, (50_000,), torch.bfloat16, seed=resample, unmoved=0.5)
    replicas[0][:300] = base[:300]
    for r in replicas:
        r[1000:1100] = base[1000:1100]
    sds = [{"w": r} for r in replicas]
    method = ParameterSelection(resample=resample)
    with_table = merge_state_dicts(sds, base={"w": base}, method=method, seed=8, chunk_numel=7001)
    rng = KeyedRandom(8)
    moved = methods_module.moved_bits(
        [r.view(torch.int16) for r in replicas], base.view(torch.int16)
    )
    choice_table = method.choose(ChunkContext(rng, "w", 0), base.numel(), k, moved)
    monkeypatch.setattr(methods_module, "_TABLES", {})
    monkeypatch.setattr(methods_module, "_MAX_TABLE_ENTRIES", 0)
    direct = merge_state_dicts(sds, base={"w": base}, method=method, seed=8, chunk_numel=4096)
    choice_direct = method.choose(ChunkContext(rng, "w", 0), base.numel(), k, moved)
    assert torch.equal(with_table["w"].view(torch.int16), direct["w"].view(torch.int16))
    assert torch.equal(choice_table.long(), choice_direct.long())


def test_moved_bits_of_some_replicas_in_a_wider_dtype():
    """A rank's own replicas (a mapping) set their own bits, here beyond a uint8's width."""
    base, replicas = make_replicas(10, (500,), torch.bfloat16, seed=4, unmoved=0.5)
    bits = {k: replicas[k].view(torch.int16) for k in (1, 8, 9)}
    moved = methods_module.moved_bits(bits, base.view(torch.int16), dtype=torch.int32)
    expected = sum((bits[k] != base.view(torch.int16)).int() << k for k in bits)
    assert moved.dtype == torch.int32 and torch.equal(moved, expected)
    # without a dtype: wide enough for the highest replica index, not for the mapping's length
    moved = methods_module.moved_bits(bits, base.view(torch.int16))
    assert moved.dtype == torch.int16 and torch.equal(moved.int(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_moved_bits_added_into_a_same_dtype_index(dtype):
    """The table path adds the moved bits into its index (the elements' own integer dtype) whose
    low bits are clear: the bits above them must survive, the result equal ``index | moved``."""
    base, replicas = make_replicas(4, (3000,), dtype, seed=6, unmoved=0.5)
    width = methods_module.bit_view(base).dtype
    bits = [methods_module.bit_view(r) for r in replicas]
    gen = torch.Generator().manual_seed(1)
    high = (torch.randint(-(1 << 11), 1 << 11, (3000,), generator=gen) << 4).to(width)
    moved = methods_module.moved_bits(
        bits, methods_module.bit_view(base), out=high.clone(), accumulate=True
    )
    expected = sum((b != methods_module.bit_view(base)).to(width) << k for k, b in enumerate(bits))
    assert moved.dtype == width and torch.equal(moved, high | expected)


def test_moved_bits_with_a_bit_at_the_sign_of_a_same_dtype_out():
    """K = 8 into an int8 ``out``: bit 7 is the sign bit, which the shifted add cannot take
    (alpha 128 overflows int8); the bits still come out right."""
    base = torch.zeros(256, dtype=torch.int8)
    bits = [((torch.arange(256) >> k) & 1).to(torch.int8) for k in range(8)]  # row i moved i
    moved = methods_module.moved_bits(bits, base, out=torch.empty(256, dtype=torch.int8))
    assert torch.equal(moved.view(torch.uint8), torch.arange(256).to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("resample", [0, 4])
def test_selection_copies_extreme_bit_patterns_exactly(dtype, resample):
    """The 8/16-bit select does wrapping arithmetic on bit patterns (``a - (b - a) * mask``):
    lane minima and maxima, NaN payloads and -0.0 must come out as the chosen replica's bits."""
    width = torch.int8 if dtype.itemsize == 1 else torch.int16
    info = torch.iinfo(width)
    extremes = torch.tensor([info.min, info.max, -1, 0, 1, info.min + 1, info.max - 1])
    gen = torch.Generator().manual_seed(5)
    k, n = 4, 4096
    patterns = [extremes[torch.randint(0, len(extremes), (n,), generator=gen)] for _ in range(k)]
    replicas = [p.to(width).view(dtype) for p in patterns]
    base = torch.zeros(n, dtype=width).view(dtype)
    method = ParameterSelection(resample=resample)
    base_or_none = base if resample else None
    out = method.merge_chunk(ChunkContext(KeyedRandom(2), "w", 0), replicas, base_or_none)
    expected = reference_selection("w", replicas, base_or_none, 2, resample=resample)
    assert torch.equal(out.view(width), expected.view(width))
    # every output element is one of the replicas' elements, bit for bit
    stacked = torch.stack([r.view(width) for r in replicas])
    assert (stacked == out.view(width)).any(0).all()


@pytest.mark.parametrize(
    "k,resample,probabilities,lane_bits",
    [
        (4, 0, None, 8),
        (4, 3, None, 8),
        (4, 4, None, 16),
        (2, 7, None, 8),
        (2, 8, None, 16),
        (8, 5, None, None),
        (3, 0, None, None),
        (4, 0, [0.25] * 4, 8),  # resolves to exactly 1/K: the same draws as None
        (4, 0, [0.5, 0.25, 0.125, 0.125], None),
    ],
)
def test_draw_lane_width(k, resample, probabilities, lane_bits):
    method = ParameterSelection(probabilities=probabilities, resample=resample)
    assert method.draw_lane_bits(k) == lane_bits
    assert method.candidates_share_one_draw(k) == (lane_bits is not None)
