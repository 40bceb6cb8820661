"""Plain, element-by-element definitions of the random draws, for checking the fast code."""

import hashlib
import math

import torch

from lightning_selmerge.merging import KeyedRandom

MASK64 = (1 << 64) - 1


def splitmix64_reference(state: int) -> int:
    """SplitMix64's output for counter state ``state`` in plain Python integers."""
    z = state & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def reference_lane(seed: int, name: str, stream: int, offset: int, lane_bits: int = 16) -> int:
    """Element ``offset``'s ``lane_bits``-wide lane (8 or 16) of a stream, as an unsigned int."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{stream}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "little")
    per_word = 64 // lane_bits
    word = splitmix64_reference(key + (offset // per_word) * 0x9E3779B97F4A7C15)
    return (word >> (lane_bits * (offset % per_word))) & ((1 << lane_bits) - 1)


def candidate(
    rng: KeyedRandom, name: str, offset: int, j: int, k: int, probabilities=None, resample: int = 0
) -> int:
    """Replica index of candidate ``j`` of element ``offset``, as the docs define it."""
    bits = k.bit_length() - 1
    used = (resample + 1) * bits
    if probabilities is None and k & (k - 1) == 0 and used <= 16:  # one draw: 8- or 16-bit lane
        lane_bits = 8 if used <= 8 else 16
        u = reference_lane(rng.seed, name, 0, offset, lane_bits)
        return (u >> (lane_bits - (j + 1) * bits)) & (k - 1)
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
