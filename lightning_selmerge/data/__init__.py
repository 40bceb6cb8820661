"""Data orders: per-replica, per-epoch samplers and the sample-index batch convention."""

from lightning_selmerge.data.indexed import SAMPLE_INDEX_KEY, SAMPLE_LOSS_KEY, IndexedDataset
from lightning_selmerge.data.sampler import DataOrderSampler
from lightning_selmerge.data.seeding import stable_generator, stable_seed

__all__ = [
    "SAMPLE_INDEX_KEY",
    "SAMPLE_LOSS_KEY",
    "DataOrderSampler",
    "IndexedDataset",
    "stable_generator",
    "stable_seed",
]
