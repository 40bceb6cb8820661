"""Batch sampler that runs K replicas' data orders one after another inside one epoch."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from lightning_selmerge.data.sampler import DataOrderSampler

__all__ = ["EnsembleBatchSampler"]


class EnsembleBatchSampler(Sampler[list[int]]):
    """Yield replica 0's order in batches, then replica 1's, ..., for the sampler's epoch.

    Every batch belongs to exactly one replica: a replica's last partial batch stays a batch of
    that replica (or is dropped with ``drop_last``). Lightning calls ``set_epoch`` on
    :attr:`sampler` (the :class:`DataOrderSampler`) before each epoch.

    Args:
        sampler: the source of the per-(epoch, replica) orders.
        num_replicas: K, the number of replicas run one after another.
        batch_size: samples per batch.
        drop_last: drop each replica's last incomplete batch.
        limit_batches: keep only the first ``limit_batches`` batches of every replica.

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
    ) -> None:
        if num_replicas < 1 or batch_size < 1:
            raise ValueError("EnsembleBatchSampler: num_replicas and batch_size must be >= 1.")
        self.sampler = sampler
        self.num_replicas = int(num_replicas)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        n = len(sampler)
        full = n // self.batch_size if drop_last else -(-n // self.batch_size)
        self.batches_per_replica = full if limit_batches is None else min(full, int(limit_batches))
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` skip its first ``batches_done`` batches."""
        self.sampler.set_epoch(epoch)
        self._resume = (epoch, batches_done)

    def replica_of(self, batch_idx: int) -> int:
        """The replica that batch ``batch_idx`` of the epoch belongs to."""
        return batch_idx // self.batches_per_replica

    def replica_batches(self, epoch: int, replica: int) -> list[list[int]]:
        """The batches of ``replica`` in ``epoch``, in order."""
        order = self.sampler.indices(epoch, replica).tolist()
        size = self.batch_size
        return [order[i * size : (i + 1) * size] for i in range(self.batches_per_replica)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.sampler.epoch  # read lazily: Lightning sets the epoch after iter()
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        for replica in range(self.num_replicas):
            start = max(0, skip - replica * self.batches_per_replica)
            if start < self.batches_per_replica:
                yield from self.replica_batches(epoch, replica)[start:]

    def __len__(self) -> int:
        return self.num_replicas * self.batches_per_replica
