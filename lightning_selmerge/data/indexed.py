"""The batch convention that lets callbacks know which samples a batch holds.

**Contract.** A training batch is a mapping (dict) with a key ``"sample_index"``
(:data:`SAMPLE_INDEX_KEY`) holding the dataset index of every sample in the batch, a LongTensor of
shape ``[B]`` after default collation. :class:`IndexedDataset` adds that key to any map-style
dataset; the default ``collate_fn`` then stacks it like any other field. Models simply ignore the
key (pop it or pass only the fields they need).

Per-sample losses come from the LightningModule in either (or both) of two ways:

* ``training_step`` returns ``{"loss": loss, "sample_loss": per_sample}`` with ``per_sample`` of
  shape ``[B]``, aligned with ``batch["sample_index"]`` (recorded during training);
* the module defines ``per_sample_loss(self, batch) -> Tensor[B]``, used by probes that
  re-evaluate a fixed subset of the training set in eval mode under ``torch.no_grad()``.

See :mod:`lightning_selmerge.imbalance.losses` for ready-made per-sample losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

__all__ = ["SAMPLE_INDEX_KEY", "SAMPLE_LOSS_KEY", "IndexedDataset"]

#: Batch key carrying the dataset indices of the samples in a batch.
SAMPLE_INDEX_KEY = "sample_index"
#: Key of the per-sample loss tensor in the dict returned by ``training_step``.
SAMPLE_LOSS_KEY = "sample_loss"


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each item is a dict carrying its own ``"sample_index"``.

    Items that are mappings are copied and get the extra key. Other items (tuples, tensors) are
    turned into dicts: with ``field_names`` a tuple item is zipped into named fields, otherwise
    the whole item goes under ``"inputs"``.

    Args:
        dataset: a map-style dataset (``__getitem__`` + ``__len__``).
        field_names: names for the parts of tuple/list items, e.g. ``("x", "y")``.
        index_key: the key to add (default :data:`SAMPLE_INDEX_KEY`).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> base = TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
        >>> ds = IndexedDataset(base, field_names=("x", "y"))
        >>> batch = next(iter(DataLoader(ds, batch_size=4)))
        >>> batch["sample_index"].tolist(), batch["x"].shape
        ([0, 1, 2, 3], torch.Size([4, 3]))
    """

    def __init__(
        self,
        dataset: Any,
        field_names: Sequence[str] | None = None,
        index_key: str = SAMPLE_INDEX_KEY,
    ) -> None:
        self.dataset = dataset
        self.field_names = tuple(field_names) if field_names is not None else None
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if self.index_key in item:
                raise KeyError(f"IndexedDataset: item already has a {self.index_key!r} field.")
            out = dict(item)
        elif self.field_names is not None and isinstance(item, (tuple, list)):
            if len(item) != len(self.field_names):
                raise ValueError(
                    f"IndexedDataset: item has {len(item)} parts but field_names has "
                    f"{len(self.field_names)}: {self.field_names}."
                )
            out = dict(zip(self.field_names, item, strict=True))
        else:
            out = {"inputs": item}
        out[self.index_key] = int(index)
        return out
