"""The collective merge (replicas on different gloo ranks) equals the single-process merge."""

from __future__ import annotations

import collective_worker
import pytest
import torch.multiprocessing as mp


@pytest.mark.parametrize(
    ("world", "groups", "num_replicas"),
    [
        (4, 2, 4),  # 2 replica groups x 2 shards, 2 replicas per group
        (2, 2, 4),  # 2 replica groups of whole tensors, 2 replicas per group
        (3, 3, 3),  # K = 3: no power of two
        (2, 1, 2),  # one group of 2 shards holding both replicas: no replica collective at all
    ],
)
def test_collective_merge_is_bit_identical_to_single_process(tmp_path, world, groups, num_replicas):
    mp.start_processes(
        collective_worker.run,
        args=(world, str(tmp_path / "init"), groups, num_replicas),
        nprocs=world,
        start_method="spawn",
    )


def test_ranks_holding_replicas_tied_unlike_are_refused(tmp_path):
    mp.start_processes(
        collective_worker.run_tied_unlike,
        args=(2, str(tmp_path / "init")),
        nprocs=2,
        start_method="spawn",
    )
