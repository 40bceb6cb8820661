"""selection_candidates against the element-by-element reference and against merge_chunk."""

import pytest
import torch
from reference_merge import candidate

from lightning_selmerge.merging import KeyedRandom, ParameterSelection
from lightning_selmerge.merging.methods import ChunkContext
from lightning_selmerge.merging.methods.selection_candidates import selection_candidates

SKEWED = {
    2: [0.3, 0.7],
    3: [0.5, 0.25, 0.25],
    4: [0.1, 0.2, 0.3, 0.4],
    7: [0.04, 0.06, 0.1, 0.1, 0.2, 0.2, 0.3],
    8: [0.05] * 4 + [0.2] * 4,
    16: [0.03] * 8 + [0.095] * 8,
}


def _probabilities(k: int, skewed: bool) -> list[float] | None:
    if not skewed:
        return None
    probabilities = SKEWED[k]
    assert abs(sum(probabilities) - 1) < 1e-9
    return probabilities


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("resample", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("k", [2, 3, 4, 7, 8, 16])
def test_candidates_match_the_reference(k: int, resample: int, skewed: bool) -> None:
    probabilities = _probabilities(k, skewed)
    method = ParameterSelection(probabilities=probabilities, resample=resample)
    rng = KeyedRandom(11)
    start, numel = 5, 37  # an offset that is not a multiple of a word's lanes
    got = selection_candidates(method, ChunkContext(rng, "layer.w", start), numel, k)
    assert got.shape == (resample + 1, numel) and got.dtype == torch.uint8
    expected = [
        [candidate(rng, "layer.w", start + i, j, k, probabilities, resample) for i in range(numel)]
        for j in range(resample + 1)
    ]
    assert got.tolist() == expected


@pytest.mark.parametrize("resample", [0, 1, 3])
@pytest.mark.parametrize("k", [3, 4, 9, 16])
def test_candidates_resolve_to_merge_chunks_choice(k: int, resample: int) -> None:
    """First moved candidate (else the base) reproduces merge_chunk's bits, chunk by chunk."""
    gen = torch.Generator().manual_seed(k * 10 + resample)
    base = torch.randn(300, generator=gen).to(torch.bfloat16)
    replicas = [
        torch.where(torch.rand(300, generator=gen) < 0.6, base, torch.randn(300, generator=gen)).to(
            torch.bfloat16
        )
        for _ in range(k)
    ]
    method = ParameterSelection(resample=resample)
    rng = KeyedRandom(3)
    merged = method.merge_chunk(ChunkContext(rng, "t", 100), replicas, base if resample else None)
    cands = selection_candidates(method, ChunkContext(rng, "t", 100), 300, k).long()
    stacked = torch.stack(replicas)
    expected = base.clone() if resample else stacked[cands[0], torch.arange(300)]
    if resample:
        settled = torch.zeros(300, dtype=torch.bool)
        for j in range(resample + 1):
            value = stacked[cands[j], torch.arange(300)]
            take = ~settled & (value.view(torch.int16) != base.view(torch.int16))
            expected[take] = value[take]
            settled |= take
    assert torch.equal(merged.view(torch.int16), expected.view(torch.int16))
