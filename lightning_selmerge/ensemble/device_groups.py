"""The replica x shard layout of a distributed ensemble and the sharded-state plumbing it needs.

``world = R x G`` ranks form a 2-D device mesh ``("replica", "shard")``: rank ``r * G + s`` is
shard ``s`` of replica group ``r``. Replica group ``r`` trains replicas ``r * K/R ..
(r + 1) * K/R - 1`` one after another, each sharded with FSDP2 (``fully_shard``) over the group's
G ranks. Sharded tensors are handled as their local slices (``DTensor.to_local()``), which is
what the replica store keeps and what the collective merge reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.distributed.tensor import DTensor, Shard

from lightning_selmerge.ensemble.replica_store import local_tensor
from lightning_selmerge.merging.collective import shard_offset
from lightning_selmerge.merging.ties import storage_key

__all__ = [
    "ReplicaLayout",
    "broadcast_weights",
    "full_state",
    "load_local_state",
    "load_optimizer_state",
    "local_offsets",
    "local_slices",
    "shard_module",
]


@dataclass(frozen=True)
class ReplicaLayout:
    """Which replicas and which shard a rank of a ``replica_groups x shard_size`` mesh holds.

    Example:
        >>> layout = ReplicaLayout.for_world(num_replicas=8, world_size=4, shard_size=2, rank=3)
        >>> layout.replica_groups, layout.replica_group, layout.shard_rank, layout.local_replicas
        (2, 1, 1, [4, 5, 6, 7])
    """

    num_replicas: int
    replica_groups: int
    shard_size: int
    rank: int

    @classmethod
    def for_world(
        cls, num_replicas: int, world_size: int, shard_size: int, rank: int, device_type: str = ""
    ) -> ReplicaLayout:
        """The layout of ``world_size`` ranks, or a clear error when it does not divide.

        ``device_type`` (``"cpu"``, ``"cuda"``) only words the error: on CPU, ``devices=auto``
        is 1 device.
        """
        if shard_size < 1:
            raise MisconfigurationException(
                f"DataOrderEnsemble: shard_size={shard_size}; use 1 (no sharding) or more."
            )
        if world_size % shard_size:
            ranks = f"{world_size} rank{'' if world_size == 1 else 's'}"
            cpu = " (on CPU, devices=auto is 1 device)" if device_type == "cpu" else ""
            raise MisconfigurationException(
                f"DataOrderEnsemble: devices x num_nodes = {ranks} is not divisible by "
                f"shard_size={shard_size}{cpu}; give a multiple of shard_size devices (e.g. "
                f"--trainer.devices={shard_size}) or a shard_size that divides the number of "
                "ranks (each replica group is shard_size ranks)."
            )
        groups = world_size // shard_size
        if num_replicas % groups:
            raise MisconfigurationException(
                f"DataOrderEnsemble: {world_size} ranks / shard_size={shard_size} make {groups} "
                f"replica groups, which cannot split num_replicas={num_replicas} evenly; use a "
                f"num_replicas that is a multiple of {groups} (or change devices / shard_size)."
            )
        return cls(num_replicas, groups, shard_size, rank)

    @property
    def replica_group(self) -> int:
        return self.rank // self.shard_size

    @property
    def shard_rank(self) -> int:
        return self.rank % self.shard_size

    @property
    def local_replicas(self) -> list[int]:
        """The replicas this rank's group trains, in training order."""
        per_group = self.num_replicas // self.replica_groups
        first = self.replica_group * per_group
        return list(range(first, first + per_group))

    def to_dict(self) -> dict[str, int]:
        return {
            "num_replicas": self.num_replicas,
            "replica_groups": self.replica_groups,
            "shard_size": self.shard_size,
        }


def _sharded_like(value: torch.Tensor, spec: DTensor) -> DTensor:
    """``value`` (a local slice) as a DTensor sharded like ``spec``."""
    return DTensor.from_local(
        value.to(spec.device),
        spec.device_mesh,
        spec.placements,
        shape=spec.shape,
        stride=spec.stride(),
        run_check=False,
    )


@torch.no_grad()
def broadcast_weights(module: torch.nn.Module, replica_mesh: Any) -> None:
    """Give every rank global rank 0's weights (every replica starts from them).

    A module an earlier fit sharded (``trainer.validate`` or another fit after a sharded fit)
    holds DTensors: each local slice comes from shard rank s of replica group 0, over the
    ``replica`` mesh dimension (rank 0's slice is another part of the tensor).
    """
    group = replica_mesh.get_group()
    for tensor in module.state_dict().values():
        if isinstance(tensor, DTensor):
            dist.broadcast(tensor.to_local(), group=group, group_src=0)
        else:
            dist.broadcast(tensor, src=0)


def shard_module(
    root: torch.nn.Module, mesh: Any, module_classes: Iterable[str] | None = None
) -> list[str]:
    """Apply FSDP2 ``fully_shard`` over ``mesh``: to every submodule whose class name is in
    ``module_classes`` (default: the ``_no_split_modules`` of the Hugging Face models inside),
    then to every direct child of ``root`` that holds parameters. Returns the sharded names."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(True for _ in root.parameters(recurse=False)):
        raise MisconfigurationException(
            f"DataOrderEnsemble(shard_size > 1): {type(root).__name__} holds parameters directly; "
            "FSDP shards submodules, so keep parameters inside a submodule (e.g. self.model)."
        )
    if module_classes is None:
        found: set[str] = set()
        for module in root.modules():
            found.update(getattr(module, "_no_split_modules", None) or ())
        module_classes = found
    classes = set(module_classes)
    sharded = []
    for name, module in reversed(list(root.named_modules())):  # innermost first
        if name and type(module).__name__ in classes:
            fully_shard(module, mesh=mesh)
            sharded.append(name)
    for name, child in root.named_children():
        if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
            sharded.append(name)
    return sharded


def local_offsets(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Flat offset of each tensor's local slice in the full tensor (0 for unsharded tensors)."""
    offsets = {}
    for name, tensor in state.items():
        if not isinstance(tensor, DTensor):
            offsets[name] = 0
            continue
        if tuple(tensor.placements) != (Shard(0),):
            raise MisconfigurationException(
                f"DataOrderEnsemble: tensor {name!r} is placed as {tensor.placements}; the "
                "ensemble merges FSDP2 dim-0 shards (Shard(0)) only."
            )
        mesh = tensor.device_mesh
        offsets[name] = shard_offset(tensor.shape, mesh.size(), mesh.get_local_rank())
    return offsets


@torch.no_grad()
def load_local_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy local slices (as :func:`cpu_state_copy` captured them) into a sharded module."""
    for name, target in module.state_dict(keep_vars=True).items():
        local_tensor(target).copy_(state[name])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """``optimizer.load_state_dict`` for a state saved as local slices of sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            local_shape = param.to_local().shape
            entry = {
                key: _sharded_like(value, param)
                if isinstance(value, torch.Tensor) and value.dim() and value.shape == local_shape
                else value
                for key, value in entry.items()
            }
        per_param[index] = entry
    optimizer.load_state_dict({**state, "state": per_param})


def full_state(
    template: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor], keep: bool = True
) -> dict[str, torch.Tensor]:
    """Full CPU tensors from local slices; ``template`` (the module's state dict) gives the
    sharding. A collective: every rank of every shard group must call it. Ties are kept.

    With ``keep=False`` this rank takes part in the gathers (one tensor at a time) but keeps
    none of them and gets ``{}``: only a rank that writes the state needs all of it in memory.
    """
    memo: dict[tuple, torch.Tensor | None] = {}
    out = {}
    for name, spec in template.items():
        key = storage_key(local_tensor(spec))
        if key not in memo:
            value = local[name]
            if isinstance(spec, DTensor):
                value = _sharded_like(value, spec).full_tensor()
            memo[key] = value.detach().to("cpu", copy=True) if keep else None
        if keep:
            out[name] = memo[key]
    return out


def local_slices(
    template: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """This rank's slices of whole tensors, cut as ``template``'s DTensors are. Ties are kept."""
    memo: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, spec in template.items():
        key = storage_key(local_tensor(spec))
        if key not in memo:
            value = full[name]
            if isinstance(spec, DTensor):
                mesh = spec.device_mesh
                start = shard_offset(spec.shape, mesh.size(), mesh.get_local_rank())
                value = value.reshape(-1)[start : start + spec.to_local().numel()]
                value = value.view(spec.to_local().shape)
            memo[key] = value.detach().to("cpu", copy=True)
        out[name] = memo[key]
    return out


def reduce_replica_values(
    values: Mapping[int, Mapping[str, float]],
    layout: ReplicaLayout,
    device: torch.device,
    names: Sequence[str],
) -> dict[int, dict[str, float]]:
    """Every replica's metrics on every rank: each group's shard ranks hold means over their
    slice of the data (equal sizes), so the replica's value is their mean."""
    table = torch.zeros(layout.num_replicas, len(names), dtype=torch.float64, device=device)
    for replica, metrics in values.items():
        for j, name in enumerate(names):
            table[replica, j] = float(metrics[name])
    dist.all_reduce(table)
    table /= layout.shard_size
    rows = table.cpu().tolist()
    return {k: dict(zip(names, rows[k])) for k in range(layout.num_replicas)}
