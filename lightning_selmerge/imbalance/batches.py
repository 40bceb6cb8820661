"""What a training batch holds: its sample indices and the train loader's shard layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_selmerge.data.indexed import SAMPLE_INDEX_KEY
from lightning_selmerge.data.sampler import DataOrderSampler

__all__ = [
    "batch_len",
    "batch_sample_indices",
    "check_sample_indices",
    "find_order_sampler",
    "positions_agree",
    "shard_layout",
]


_SAMPLE_INDEX_FIX = (
    "sample_index must be each item's index in the dataset the train loader holds: wrap the "
    "outermost dataset, e.g. IndexedDataset(Subset(data, indices)) or IndexedDataset("
    "random_split(data, ...)[0]), not Subset(IndexedDataset(data), indices)"
)


def check_sample_indices(dataset: Any, samples: torch.Tensor, checked: int = 8) -> None:
    """Refuse batches whose ``sample_index`` values are not indices of ``dataset`` (the train
    loader's): out of its range, or (for up to ``checked`` of them) naming an item that
    carries another ``sample_index``. The probe reads the samples by those indices.

    Example:
        >>> data = [{"x": 0, "sample_index": 5}, {"x": 1, "sample_index": 6}]
        >>> check_sample_indices(data, torch.tensor([1]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: PositionLossMonitor: ...
    """
    if samples.numel() == 0 or not hasattr(dataset, "__len__"):
        return
    size = len(dataset)
    low, high = int(samples.min()), int(samples.max())
    if low < 0 or high >= size:
        raise MisconfigurationException(
            f"PositionLossMonitor: a batch's sample_index {high if high >= size else low} is "
            f"not an index of the train dataset's {size} samples: {_SAMPLE_INDEX_FIX}."
        )
    for index in samples.unique()[:checked].tolist():
        item = dataset[index]
        carried = item.get(SAMPLE_INDEX_KEY) if isinstance(item, Mapping) else None
        if carried is not None and int(carried) != index:
            raise MisconfigurationException(
                f"PositionLossMonitor: item {index} of the train dataset carries sample_index "
                f"{int(carried)}: {_SAMPLE_INDEX_FIX}."
            )


def find_order_sampler(loader: Any) -> DataOrderSampler | None:
    """The loader's :class:`DataOrderSampler` (as its sampler or its batch sampler's), if any.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> orders = DataOrderSampler(num_samples=4, seed=0)
        >>> find_order_sampler(DataLoader(range(4), sampler=orders)) is orders
        True
        >>> find_order_sampler(DataLoader(range(4))) is None
        True
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(sampler, DataOrderSampler):
            return sampler
    return None


def shard_layout(loader: Any) -> tuple[int, int]:
    """(number of shards, this shard) of a strided sampler; (1, 0) when the loader is unsharded.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> shard = DataOrderSampler(num_samples=6, seed=0, num_shards=3, shard_rank=2)
        >>> shard_layout(DataLoader(range(6), sampler=shard)), shard_layout(None)
        ((3, 2), (1, 0))
    """
    sampler = find_order_sampler(loader)
    if sampler is not None:
        return sampler.num_shards, sampler.shard_rank
    inner = getattr(loader, "sampler", None)
    if hasattr(inner, "num_replicas") and hasattr(inner, "rank"):  # DistributedSampler & co
        return int(inner.num_replicas), int(inner.rank)
    return 1, 0


def positions_agree(observed: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether every observed position (>= 0) equals the expected one.

    Example:
        >>> positions_agree(torch.tensor([1, -1, 0]), torch.tensor([1, 2, 0]))
        True
    """
    n = min(observed.numel(), expected.numel())
    seen = observed[:n] >= 0
    return torch.equal(observed[:n][seen], expected[:n][seen]) and bool((observed[n:] < 0).all())


def batch_len(batch: Any) -> int:
    """The number of samples in a batch (tensor, mapping or sequence of them).

    Example:
        >>> batch_len({"x": torch.zeros(3, 2)}), batch_len([torch.zeros(5)])
        (3, 5)
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    raise MisconfigurationException("PositionLossMonitor: cannot infer the batch size.")


def batch_sample_indices(
    batch: Any,
    loader: Any,
    epoch: int,
    replica: int,
    positions: torch.Tensor | None = None,
    arrived: int = 0,
    index_key: str = SAMPLE_INDEX_KEY,
) -> torch.Tensor:
    """The sample indices of a training batch: its ``index_key`` entry when it has one, else
    those of the train loader's :class:`DataOrderSampler` for ``(epoch, replica)``: at
    ``positions`` of the replica's order (wrapping around, as its padding does), or, without
    them, the next batch of this shard's indices after the first ``arrived``.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> orders = DataOrderSampler(num_samples=6, seed=0)
        >>> loader = DataLoader(range(6), sampler=orders, batch_size=2)
        >>> order = orders.order(0, 0)
        >>> bool((batch_sample_indices(None, loader, 0, 0, arrived=2) == order[2:4]).all())
        True
        >>> batch_sample_indices({"sample_index": [5, 1]}, loader, 0, 0).tolist()
        [5, 1]
    """
    if isinstance(batch, Mapping) and index_key in batch:
        return torch.as_tensor(batch[index_key]).reshape(-1).long().cpu()
    sampler = find_order_sampler(loader)
    if sampler is None:
        raise MisconfigurationException(
            f"PositionLossMonitor cannot tell which samples a batch holds: the batch has "
            f"no {index_key!r} key and the train loader has no DataOrderSampler. "
            "Wrap the dataset in lightning_selmerge.data.IndexedDataset (dict batches "
            f"with {index_key!r}) or sample with DataOrderSampler."
        )
    if positions is not None:
        order = sampler.order(epoch, replica)
        return order[positions % max(order.numel(), 1)]
    order = sampler.indices(epoch, replica)
    size = getattr(loader, "batch_size", None) or batch_len(batch)
    return order[arrived : arrived + size]
