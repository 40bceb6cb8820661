"""Inputs of the kernel tests: replicas that leave some of their elements at the base's bits."""

from __future__ import annotations

import torch


def replicas_off_base(num_replicas, numel, dtype, moved_share, seed, device="cpu"):
    """``num_replicas`` replicas and their base; each replica moves about ``moved_share`` of its
    elements off the base (to fresh normal values) and keeps the others' bits."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator).to(dtype)
    replicas = []
    for _ in range(num_replicas):
        replica = base.clone()
        moved = torch.rand(numel, generator=generator) < moved_share
        replica[moved] = torch.randn(int(moved.sum()), generator=generator).to(dtype)
        replicas.append(replica.to(device))
    return replicas, base.to(device)
