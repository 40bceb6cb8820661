"""Per-replica, per-epoch data orders: the single source of truth for "which sample sat where".

Vocabulary used across the library:

* the **replica order** of ``(epoch, replica)`` is the sequence of sample indices that the whole
  replica group consumes in that epoch, *unsharded*: :meth:`DataOrderSampler.order`. A sample's
  **position** is its index in that sequence (:meth:`DataOrderSampler.positions`), so position 0 is
  the first sample the replica ever trains on in that epoch.
* **sharding** is strided, like :class:`torch.utils.data.DistributedSampler`: shard ``k`` of ``S``
  gets ``order[k::S]``. With a per-rank batch size ``B``, the ``j``-th local batches of all shards
  together hold exactly positions ``[j*B*S, (j+1)*B*S)``: one global batch is one contiguous block
  of the replica order, so "position" keeps meaning "when the replica saw it".
* when ``len(dataset)`` is not divisible by ``num_shards``: ``drop_last=True`` cuts the tail of the
  replica order (those samples get position ``-1``); ``drop_last=False`` pads the order by
  wrapping around to its start, so some samples appear twice (their position is the first one).

The sampler is pure torch: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from lightning_selmerge.data.seeding import stable_generator

__all__ = ["DataOrderSampler"]


class DataOrderSampler(Sampler[int]):
    """Map-style sampler giving each replica its own permutation in every epoch.

    The permutation of ``(epoch, replica)`` comes from a ``torch.Generator`` seeded by a BLAKE2b
    hash of ``(seed, replica, epoch)``: reproducible across runs, processes and machines, and
    different for every replica and epoch. Call :meth:`set_epoch` before each epoch (Lightning
    does so automatically for samplers that have it).

    With ``fixed_batches=True`` (the paper's Table 4 ablation) the *composition* of the global
    batches is drawn once from ``seed`` alone, identical for every replica and epoch, and only the
    *order of the batches* is permuted per ``(seed, replica, epoch)``. A global batch holds
    ``batch_size * num_shards`` samples (``batch_size`` is the per-rank DataLoader batch size);
    a final incomplete batch, if any, always stays last.

    Args:
        data_source: the dataset (only its length is used). Give this or ``num_samples``.
        num_samples: the dataset length, instead of ``data_source``.
        seed: the run's data-order seed.
        replica: which replica's order to produce (settable later via :attr:`replica`).
        epoch: the starting epoch (see :meth:`set_epoch`).
        shuffle: ``False`` gives the identity order (dataset order) in every epoch.
        fixed_batches: fix batch membership from ``seed``; permute only the batch order.
        batch_size: per-rank batch size; required when ``fixed_batches`` is set.
        num_shards: number of ranks sharing one replica (data parallel inside a replica group).
        shard_rank: this rank's index in ``[0, num_shards)``.
        drop_last: drop the tail to make the order divisible by ``num_shards`` (else pad by
            wrap-around, like ``DistributedSampler``).

    Example:
        >>> sampler = DataOrderSampler(num_samples=6, seed=1, replica=0)
        >>> sorted(sampler) == list(range(6))
        True
        >>> other = DataOrderSampler(num_samples=6, seed=1, replica=1)
        >>> sampler.order().tolist() != other.order().tolist()
        True
        >>> order = sampler.order(epoch=2, replica=3)        # any replica, any epoch, O(n)
        >>> bool((sampler.positions(epoch=2, replica=3)[order] == torch.arange(6)).all())
        True
        >>> shard = DataOrderSampler(num_samples=6, seed=1, num_shards=2, shard_rank=1)
        >>> shard.indices().tolist() == shard.order()[1::2].tolist()
        True
    """

    def __init__(
        self,
        data_source: Sized | None = None,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        replica: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        fixed_batches: bool = False,
        batch_size: int | None = None,
        num_shards: int = 1,
        shard_rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if (data_source is None) == (num_samples is None):
            raise ValueError("DataOrderSampler: give one of `data_source` or `num_samples`.")
        n = len(data_source) if data_source is not None else int(num_samples)  # type: ignore
        if n < 0:
            raise ValueError(f"DataOrderSampler: num_samples must be >= 0, got {n}.")
        if num_shards < 1 or not 0 <= shard_rank < num_shards:
            raise ValueError(
                f"DataOrderSampler: need num_shards >= 1 and 0 <= shard_rank < num_shards, got "
                f"num_shards={num_shards}, shard_rank={shard_rank}."
            )
        if fixed_batches:
            if not shuffle:
                raise ValueError("DataOrderSampler: fixed_batches=True needs shuffle=True.")
            if batch_size is None or batch_size < 1:
                raise ValueError(
                    "DataOrderSampler: fixed_batches=True needs batch_size (the per-rank "
                    "DataLoader batch size), e.g. DataOrderSampler(ds, fixed_batches=True, "
                    "batch_size=32)."
                )
        if replica < 0 or epoch < 0:
            raise ValueError("DataOrderSampler: replica and epoch must be >= 0.")
        self.num_samples_total = n
        self.seed = int(seed)
        self.replica = int(replica)
        self.epoch = int(epoch)
        self.shuffle = shuffle
        self.fixed_batches = fixed_batches
        self.batch_size = batch_size
        self.num_shards = int(num_shards)
        self.shard_rank = int(shard_rank)
        self.drop_last = drop_last
        if drop_last:
            self.shard_length = n // self.num_shards
        else:
            self.shard_length = math.ceil(n / self.num_shards)
        self.total_size = self.shard_length * self.num_shards

    # -- epoch / replica --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (Lightning calls this for you)."""
        self.epoch = int(epoch)

    def set_replica(self, replica: int) -> None:
        """Select the replica whose order :meth:`__iter__` yields."""
        self.replica = int(replica)

    # -- orders -----------------------------------------------------------------------------
    def permutation(self, epoch: int | None = None, replica: int | None = None) -> torch.Tensor:
        """The replica order before sharding adjustments: a permutation of ``range(n)``."""
        epoch = self.epoch if epoch is None else int(epoch)
        replica = self.replica if replica is None else int(replica)
        n = self.num_samples_total
        if not self.shuffle:
            return torch.arange(n, dtype=torch.long)
        if not self.fixed_batches:
            gen = stable_generator("selmerge.order", self.seed, replica, epoch)
            return torch.randperm(n, generator=gen)
        group = int(self.batch_size) * self.num_shards  # type: ignore[arg-type]
        membership = torch.randperm(n, generator=stable_generator("selmerge.batches", self.seed))
        num_full = n // group
        gen = stable_generator("selmerge.batch_order", self.seed, replica, epoch)
        batch_order = torch.randperm(num_full, generator=gen)
        full = membership[: num_full * group].view(num_full, group)[batch_order].reshape(-1)
        return torch.cat([full, membership[num_full * group :]])

    def order(self, epoch: int | None = None, replica: int | None = None) -> torch.Tensor:
        """Position -> sample index for the whole replica group (unsharded), as a LongTensor.

        Its length is ``total_size``: the dataset length, cut (``drop_last``) or padded by
        wrap-around to a multiple of ``num_shards``. Defaults to the current epoch and replica.
        """
        perm = self.permutation(epoch, replica)
        n, total = self.num_samples_total, self.total_size
        if total <= n:
            return perm[:total]
        if n == 0:
            raise ValueError("DataOrderSampler: cannot pad an empty dataset.")
        reps = math.ceil((total - n) / n)
        return torch.cat([perm, perm.repeat(reps)[: total - n]])

    def positions(self, epoch: int | None = None, replica: int | None = None) -> torch.Tensor:
        """Sample index -> first position in :meth:`order`; ``-1`` for samples cut by drop_last."""
        perm = self.permutation(epoch, replica)
        kept = min(self.total_size, self.num_samples_total)
        pos = torch.full((self.num_samples_total,), -1, dtype=torch.long)
        pos[perm[:kept]] = torch.arange(kept, dtype=torch.long)
        return pos

    def indices(self, epoch: int | None = None, replica: int | None = None) -> torch.Tensor:
        """This shard's sample indices, in the order :meth:`__iter__` yields them."""
        return self.order(epoch, replica)[self.shard_rank :: self.num_shards]

    def shard_positions(self) -> torch.Tensor:
        """Replica-order positions of this shard's samples: ``shard_rank + num_shards * i``."""
        return self.shard_rank + self.num_shards * torch.arange(self.shard_length)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.shard_length

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples_total}, seed={self.seed}, "
            f"replica={self.replica}, epoch={self.epoch}, shuffle={self.shuffle}, "
            f"fixed_batches={self.fixed_batches}, batch_size={self.batch_size}, "
            f"num_shards={self.num_shards}, shard_rank={self.shard_rank}, "
            f"drop_last={self.drop_last})"
        )
