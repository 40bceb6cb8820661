"""DataOrderSampler: per-replica/epoch orders, fixed batches, sharding, positions."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_selmerge.data import DataOrderSampler, IndexedDataset, stable_seed


def test_orders_are_permutations_reproducible_and_distinct() -> None:
    n = 97
    orders = {}
    for replica in range(3):
        for epoch in range(3):
            s = DataOrderSampler(num_samples=n, seed=5, replica=replica)
            s.set_epoch(epoch)
            got = torch.tensor(list(s))
            assert sorted(got.tolist()) == list(range(n))
            again = DataOrderSampler(num_samples=n, seed=5).order(epoch=epoch, replica=replica)
            assert torch.equal(got, again)
            orders[(replica, epoch)] = tuple(got.tolist())
    assert len(set(orders.values())) == 9
    other_seed = DataOrderSampler(num_samples=n, seed=6).order(epoch=0, replica=0)
    assert tuple(other_seed.tolist()) != orders[(0, 0)]


def test_stable_seed_is_a_fixed_hash() -> None:
    # blake2b-derived, so independent of PYTHONHASHSEED and of the process.
    assert stable_seed("selmerge.order", 0, 0, 0) == stable_seed("selmerge.order", 0, 0, 0)
    assert stable_seed("a", 1) != stable_seed("a", "1")
    assert stable_seed("x") == 5090411203699445696  # pinned: a change breaks reproducibility
    # pinned order for torch's CPU randperm (torch 2.x): guards against a silent seeding change
    assert DataOrderSampler(num_samples=8, seed=0).order().tolist() == [2, 1, 5, 7, 6, 3, 0, 4]


def test_shuffle_false_is_identity() -> None:
    s = DataOrderSampler(num_samples=10, shuffle=False, replica=3, epoch=4)
    assert list(s) == list(range(10))


def test_positions_invert_order() -> None:
    s = DataOrderSampler(num_samples=50, seed=1, replica=2, epoch=1)
    order, pos = s.order(), s.positions()
    assert torch.equal(pos[order], torch.arange(50))
    assert torch.equal(order[pos], torch.arange(50))


@pytest.mark.parametrize("n,batch_size,shards", [(64, 4, 1), (70, 4, 1), (70, 3, 2)])
def test_fixed_batches_keep_membership_and_permute_batch_order(
    n: int, batch_size: int, shards: int
) -> None:
    group = batch_size * shards
    sets, orders = [], []
    for replica in range(2):
        for epoch in range(3):
            s = DataOrderSampler(
                num_samples=n,
                seed=3,
                replica=replica,
                epoch=epoch,
                fixed_batches=True,
                batch_size=batch_size,
                num_shards=shards,
                drop_last=True,
            )
            perm = s.permutation()
            assert sorted(perm.tolist()) == list(range(n))
            batches = [frozenset(perm[i : i + group].tolist()) for i in range(0, n, group)]
            sets.append(frozenset(batches))
            orders.append(tuple(batches))
            assert len(perm[(n // group) * group :]) == n % group  # remainder stays last
    assert len(set(sets)) == 1, "batch composition must not depend on replica or epoch"
    assert len(set(orders)) == 6, "batch order must differ per replica and epoch"


def test_fixed_batches_need_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        DataOrderSampler(num_samples=8, fixed_batches=True)


def test_fixed_batches_per_rank_batches_are_slices_of_global_batches() -> None:
    n, b, shards = 48, 4, 3
    kw = dict(num_samples=n, seed=9, fixed_batches=True, batch_size=b, num_shards=shards)
    membership = DataOrderSampler(**kw, epoch=0).permutation(epoch=0)
    fixed = {frozenset(membership[i : i + b * shards].tolist()) for i in range(0, n, b * shards)}
    for epoch in range(2):
        local = [DataOrderSampler(**kw, shard_rank=r, epoch=epoch).indices() for r in range(shards)]
        for j in range(n // (b * shards)):
            global_batch = torch.cat([loc[j * b : (j + 1) * b] for loc in local])
            assert frozenset(global_batch.tolist()) in fixed


@pytest.mark.parametrize("n,shards", [(20, 4), (23, 4), (5, 3), (2, 5)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_cover_replica_order(n: int, shards: int, drop_last: bool) -> None:
    full = DataOrderSampler(
        num_samples=n, seed=2, replica=1, epoch=3, num_shards=shards, drop_last=drop_last
    )
    parts = [
        list(
            DataOrderSampler(
                num_samples=n,
                seed=2,
                replica=1,
                epoch=3,
                num_shards=shards,
                shard_rank=r,
                drop_last=drop_last,
            )
        )
        for r in range(shards)
    ]
    lengths = {len(p) for p in parts}
    assert len(lengths) == 1 and lengths.pop() == len(full)
    flat = [i for p in parts for i in p]
    perm = full.permutation().tolist()
    if drop_last:
        assert len(flat) == (n // shards) * shards
        assert sorted(flat) == sorted(perm[: len(flat)])
        assert len(set(flat)) == len(flat)  # each kept sample exactly once
        assert int((full.positions() == -1).sum()) == n - len(flat)
    else:
        total = -(-n // shards) * shards
        assert len(flat) == total
        assert set(flat) == set(range(n))  # every sample at least once
        pad = total - n
        assert full.order().tolist() == (perm * (1 + pad // max(n, 1) + 1))[:total]
        assert (full.positions() >= 0).all()
    # strided: rank r holds positions r, r + S, ...
    order = full.order()
    for r, part in enumerate(parts):
        assert part == order[r::shards].tolist()


def test_strided_shards_make_global_batches_contiguous() -> None:
    n, b, shards = 40, 5, 2
    samplers = [
        DataOrderSampler(num_samples=n, seed=0, num_shards=shards, shard_rank=r)
        for r in range(shards)
    ]
    order = samplers[0].order()
    for j in range(n // (b * shards)):
        global_batch = torch.cat([s.indices()[j * b : (j + 1) * b] for s in samplers])
        block = order[j * b * shards : (j + 1) * b * shards]
        assert set(global_batch.tolist()) == set(block.tolist())


def test_works_in_a_dataloader_with_indexed_dataset() -> None:
    data = IndexedDataset([{"x": torch.tensor(float(i))} for i in range(12)])
    sampler = DataOrderSampler(data, seed=4, replica=1)
    sampler.set_epoch(2)
    loader = DataLoader(data, batch_size=5, sampler=sampler)
    seen = torch.cat([batch["sample_index"] for batch in loader])
    assert torch.equal(seen, sampler.order(epoch=2, replica=1))
    assert torch.equal(torch.cat([b["x"] for b in loader]).long(), seen)
