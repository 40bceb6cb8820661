"""Plain, element-by-element definitions of the random draws, for checking the fast code."""

import math

import torch

from lightning_selmerge.merging import KeyedRandom


def candidate(
    rng: KeyedRandom, name: str, offset: int, j: int, k: int, probabilities=None, resample: int = 0
) -> int:
    """Replica index of candidate ``j`` of element ``offset``, as the docs define it."""
    bits = k.bit_length() - 1
    one_draw = probabilities is None and k & (k - 1) == 0 and (resample + 1) * bits <= 16
    if one_draw:
        u = rng.uniform16_at(name, 0, torch.tensor([offset])).item()
        return (u >> (16 - (j + 1) * bits)) & (k - 1)
    u = rng.uniform16_at(name, j, torch.tensor([offset])).item()
    cumulative = 0.0
    for index in range(k):
        cumulative += probabilities[index] if probabilities else 1.0 / k
        if u < math.ceil(cumulative * 65536 - 1e-9) or index == k - 1:
            return index
    raise AssertionError


def candidate_matrix(seed: int, name: str, numel: int, k: int, resample: int) -> torch.Tensor:
    """``[resample + 1, numel]`` candidates of uniform selection, element by element."""
    rng = KeyedRandom(seed)
    return torch.tensor(
        [
            [candidate(rng, name, i, j, k, None, resample) for i in range(numel)]
            for j in range(resample + 1)
        ]
    )
