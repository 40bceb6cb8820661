"""Batch sampler that runs K replicas' data orders one after another inside one epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from lightning_selmerge.data.sampler import DataOrderSampler

__all__ = ["EnsembleBatchSampler"]


class EnsembleBatchSampler(Sampler[list[int]]):
    """Yield replica 0's order in batches, then replica 1's, ..., for the sampler's epoch.

    Every batch belongs to exactly one replica: a replica's last partial batch stays a batch of
    that replica (or is dropped with ``drop_last``). Lightning calls ``set_epoch`` on
    :attr:`sampler` (the :class:`DataOrderSampler`) before each epoch.

    With ``num_shards = G > 1`` (a replica sharded over G ranks), the replica's batches are dealt
    out round-robin: optimizer step ``t`` trains on batches ``t*G .. t*G + G - 1`` of the
    replica's order, shard rank ``s`` getting batch ``t*G + s``. When the batches do not divide
    by G, the last step is padded with the replica's first batches (as ``DistributedSampler``
    pads), or dropped with ``drop_last``.

    Args:
        sampler: the source of the per-(epoch, replica) orders.
        num_replicas: K, the number of replicas run one after another.
        batch_size: samples per batch (per shard rank).
        drop_last: drop each replica's last incomplete batch (and an incomplete last step).
        limit_batches: keep only the first ``limit_batches`` batches of every replica.
        replicas: the replicas this sampler runs, in order (default: all K).
        num_shards: G, the ranks one replica is sharded over.
        shard_rank: this rank's index among them.

    Example:
        >>> orders = DataOrderSampler(num_samples=5, seed=0)
        >>> sampler = EnsembleBatchSampler(orders, num_replicas=2, batch_size=2)
        >>> sampler.batches_per_replica, len(sampler)
        (3, 6)
        >>> batches = list(sampler)
        >>> sum(batches[:3], []) == orders.order(0, 0).tolist()
        True
    """

    def __init__(
        self,
        sampler: DataOrderSampler,
        num_replicas: int,
        batch_size: int,
        drop_last: bool = False,
        limit_batches: int | None = None,
        replicas: Sequence[int] | None = None,
        num_shards: int = 1,
        shard_rank: int = 0,
    ) -> None:
        if num_replicas < 1 or batch_size < 1 or num_shards < 1:
            raise ValueError(
                "EnsembleBatchSampler: num_replicas, batch_size and num_shards must be >= 1."
            )
        self.sampler = sampler
        self.num_replicas = int(num_replicas)
        self.replicas = list(range(self.num_replicas) if replicas is None else replicas)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.num_shards, self.shard_rank = int(num_shards), int(shard_rank)
        n = len(sampler)
        self._batches_in_order = n // self.batch_size if drop_last else -(-n // self.batch_size)
        steps = self._batches_in_order // self.num_shards
        if not drop_last:
            steps = -(-self._batches_in_order // self.num_shards)
        self.batches_per_replica = (
            steps if limit_batches is None else min(steps, int(limit_batches))
        )
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` skip its first ``batches_done`` batches."""
        self.sampler.set_epoch(epoch)
        self._resume = (epoch, batches_done)

    def replica_of(self, batch_idx: int) -> int:
        """The replica that batch ``batch_idx`` of the epoch belongs to."""
        return self.replicas[batch_idx // self.batches_per_replica]

    def batch_positions(self, batch_idx: int) -> torch.Tensor:
        """Positions in its replica's order of the samples of batch ``batch_idx`` of the epoch:
        their arrival index in the pass of the replica's shard ranks together (rank ``s``'s
        ``i``-th batch of a replica is its ``i*G + s``-th), 0 first. Padding batches (the
        first ones again) arrive after the whole order, so their positions exceed its length
        and wrap around to the same samples.

        Example:
            >>> orders = DataOrderSampler(num_samples=5, seed=0)
            >>> shard_1 = EnsembleBatchSampler(orders, 1, batch_size=2, num_shards=2, shard_rank=1)
            >>> [shard_1.batch_positions(i).tolist() for i in range(2)]
            [[2, 3], [5, 6]]
        """
        step = batch_idx % self.batches_per_replica
        wraps, batch = divmod(step * self.num_shards + self.shard_rank, self._batches_in_order)
        n = len(self.sampler)
        start = wraps * n + batch * self.batch_size
        return torch.arange(start, min(start + self.batch_size, (wraps + 1) * n))

    def replica_batches(self, epoch: int, replica: int) -> list[list[int]]:
        """This shard rank's batches of ``replica`` in ``epoch``, in order."""
        order = self.sampler.indices(epoch, replica).tolist()
        size = self.batch_size
        batches = [order[i * size : (i + 1) * size] for i in range(self._batches_in_order)]
        if self.num_shards > 1 and batches:
            shards = self.num_shards
            steps = len(batches) // shards if self.drop_last else -(-len(batches) // shards)
            padded = list(itertools.islice(itertools.cycle(batches), steps * shards))
            batches = padded[self.shard_rank :: shards]
        return batches[: self.batches_per_replica]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.sampler.epoch  # read lazily: Lightning sets the epoch after iter()
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        for position, replica in enumerate(self.replicas):
            start = max(0, skip - position * self.batches_per_replica)
            if start < self.batches_per_replica:
                yield from self.replica_batches(epoch, replica)[start:]

    def __len__(self) -> int:
        return len(self.replicas) * self.batches_per_replica
