"""DARE: keyed random drops, rescale by 1 / (1 - p), then mean or selection."""

import pytest
import torch
from test_method_references import assert_matches_reference

from lightning_selmerge.merging import MergeError, merge_state_dicts
from lightning_selmerge.merging.methods import Dare, build_method


def replicas_around(base, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (base.double() + torch.randn(base.shape, generator=gen)).to(base.dtype) for _ in range(k)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "method",
    [
        Dare(),
        Dare(drop_rate=0.9, weights=[1.0, 2.0, 0.5], scale=0.7),
        Dare(drop_rate=0.0),
        Dare(combine="selection"),
        Dare(drop_rate=0.3, weights=[0.0, 2.0, 1.0], combine="selection"),
    ],
)
@pytest.mark.parametrize("chunk_numel", [1, 13, 4096])
def test_dare_matches_its_reference(dtype, method, chunk_numel):
    base = torch.randn(9, 31, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert_matches_reference(method, base, replicas_around(base, 3), 11, chunk_numel)


def test_drops_follow_the_rate_and_the_rescale_keeps_the_mean():
    n, p = 200_000, 0.75
    base = torch.zeros(n, dtype=torch.float64)
    replicas = [{"w": torch.ones(n, dtype=torch.float64)} for _ in range(2)]
    for combine in ("mean", "selection"):
        method = Dare(drop_rate=p, combine=combine)
        merged = merge_state_dicts(replicas, base={"w": base}, method=method, seed=1)["w"]
        kept_share = (merged != 0).double().mean().item()
        expected = 1 - p * p if combine == "mean" else 1 - p  # mean: dropped in both replicas
        assert abs(kept_share - expected) < 0.01
        assert abs(merged.mean().item() - 1.0) < 0.02  # E[rescaled task vector] = task vector
    assert Dare(drop_rate=p).rescale == 4.0


def test_no_drop_mean_is_the_plain_average():
    base = torch.randn(50, dtype=torch.float64)
    replicas = replicas_around(base, 3)
    merged = merge_state_dicts(
        [{"w": r} for r in replicas], base={"w": base}, method=Dare(drop_rate=0.0)
    )["w"]
    torch.testing.assert_close(merged, sum(replicas) / 3)


def test_parameters_are_checked():
    with pytest.raises(MergeError, match=r"drop_rate must be in \[0, 1\)"):
        build_method("dare", {"drop_rate": 1.0})
    with pytest.raises(MergeError, match="combine must be one of"):
        build_method("dare", {"combine": "sum"})
    with pytest.raises(MergeError, match=">= 0"):
        build_method("dare", {"weights": [1, -1]})
