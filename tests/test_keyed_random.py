import pytest
import torch
from reference_merge import reference_lane

from lightning_selmerge.merging.keyed_random import KeyedRandom


def reference_uniform16(seed: int, name: str, stream: int, offset: int) -> int:
    return reference_lane(seed, name, stream, offset, 16)


def test_uniforms_match_plain_python_splitmix64():
    rng = KeyedRandom(seed=7)
    got = rng.uniform16("layers.0.weight", 2, 1000, 50).tolist()
    expected = [reference_uniform16(7, "layers.0.weight", 2, 1000 + i) for i in range(50)]
    assert got == expected


@pytest.mark.parametrize("start,numel", [(0, 1), (5, 3), (7, 2), (8, 9), (1021, 333)])
def test_8bit_lanes_match_plain_python_and_any_range(start, numel):
    rng = KeyedRandom(seed=5)
    lanes = rng.masked_lanes("layers.0.weight", 3, start, numel, 0xFF, lane_bits=8)
    got = lanes.view(torch.uint8).tolist()
    expected = [reference_lane(5, "layers.0.weight", 3, start + i, 8) for i in range(numel)]
    assert got == expected
    buffer = torch.empty(KeyedRandom.words_needed(numel, lane_bits=8), dtype=torch.int64)
    masked = rng.masked_lanes("layers.0.weight", 3, start, numel, 0xC0, lane_bits=8, buffer=buffer)
    assert masked.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert masked.view(torch.uint8).tolist() == [e & 0xC0 for e in expected]


@pytest.mark.parametrize("start,numel", [(0, 1), (1, 7), (3, 64), (1021, 333)])
def test_ranges_and_offsets_give_the_same_draws(start, numel):
    rng = KeyedRandom(seed=3)
    whole = rng.uniform16("w", 0, 0, 2000)
    assert torch.equal(rng.uniform16("w", 0, start, numel), whole[start : start + numel])
    offsets = torch.arange(start, start + numel)
    assert torch.equal(rng.uniform16_at("w", 0, offsets), whole[start : start + numel])


def test_streams_names_and_seeds_are_independent_and_roughly_uniform():
    draws = [
        KeyedRandom(0).uniform16("a", 0, 0, 20000),
        KeyedRandom(0).uniform16("a", 1, 0, 20000),
        KeyedRandom(0).uniform16("b", 0, 0, 20000),
        KeyedRandom(1).uniform16("a", 0, 0, 20000),
    ]
    for i, a in enumerate(draws):
        assert a.min() >= 0 and a.max() < 65536
        # mean of U[0, 65536) over 20000 draws: sd of the mean is about 134
        assert abs(a.double().mean().item() - 32767.5) < 6 * 134
        for b in draws[i + 1 :]:
            assert (a == b).double().mean() < 0.01


@pytest.mark.parametrize("start,numel", [(0, 1), (3, 1), (3, 2), (5, 300_001)])
def test_hashing_into_a_buffer_gives_the_same_bits_as_a_view_of_it(start, numel):
    rng = KeyedRandom(seed=11)
    buffer = torch.empty(KeyedRandom.words_needed(numel), dtype=torch.int64)
    got = rng.masked_lanes("w", 0, start, numel, 0xFFC0, buffer=buffer)
    assert got.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert torch.equal(got, rng.masked_lanes("w", 0, start, numel, 0xFFC0))
    with pytest.raises(ValueError, match="buffer must be an int64 tensor of at least"):
        rng.bits16("w", 0, start, numel + 8, buffer=buffer)


def test_draws_do_not_depend_on_the_thread_count():
    """Blocks are sized by torch's thread count; the bits must not be."""
    rng = KeyedRandom(seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rng.bits16("w", 1, 12_345, 700_000)
        torch.set_num_threads(4)
        four = rng.bits16("w", 1, 12_345, 700_000)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)
