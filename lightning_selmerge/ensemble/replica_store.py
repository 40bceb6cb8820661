"""Where the inactive replicas' training states live: CPU memory (optionally pinned) or disk."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from lightning_selmerge.merging.leftovers import (
    OFFLOAD_PREFIX,
    clean_stale_offload_dirs,
    owner_tag,
)
from lightning_selmerge.merging.safetensors_io import SafetensorsFile
from lightning_selmerge.merging.ties import storage_key

__all__ = ["Offload", "ReplicaState", "ReplicaStore", "cpu_state_copy", "local_tensor"]

Offload = Literal["cpu", "disk"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 / DTensor) tensor's local slice; other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _cpu_copy(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    tensor = local_tensor(tensor).detach()
    if pin_memory:
        return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor)
    return tensor.to("cpu", copy=True)


def cpu_state_copy(
    state: dict[str, torch.Tensor],
    pin_memory: bool = False,
    shared: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict; tensors sharing storage (tied weights) stay tied.

    Sharded tensors (``DTensor``) are copied as their local slice. Names in ``shared`` (frozen
    parameters, the same in every replica) are not copied: they get the ``shared`` tensor.
    """
    memo: dict[tuple, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if shared is not None and name in shared:
            out[name] = shared[name]
            continue
        key = storage_key(local_tensor(tensor))
        if key not in memo:
            memo[key] = _cpu_copy(tensor, pin_memory)
        out[name] = memo[key]
    return out


def _to_cpu(obj: Any, pin_memory: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        return _cpu_copy(obj, pin_memory)
    if isinstance(obj, dict):
        return {k: _to_cpu(v, pin_memory) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, pin_memory) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class ReplicaState:
    """One replica's training state: module tensors, optimizer and step-scheduler states, and
    the precision plugin's (a mixed-precision loss scaler's scale and growth tracker)."""

    module: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    lr_schedulers: list[dict[str, Any]] = field(default_factory=list)
    precision: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "optimizers": self.optimizers,
            "lr_schedulers": self.lr_schedulers,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ReplicaState:
        return cls(
            state["module"],
            list(state["optimizers"]),
            list(state["lr_schedulers"]),
            dict(state.get("precision", {})),  # absent from checkpoints of version 0.1.0
        )

    @classmethod
    def capture(
        cls,
        module: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        lr_schedulers: list[Any],
        pin_memory: bool = False,
        precision: dict[str, Any] | None = None,
        shared: Mapping[str, torch.Tensor] | None = None,
    ) -> ReplicaState:
        """CPU copies of a live module's, optimizers' and schedulers' states (and ``precision``,
        the precision plugin's ``state_dict()``); ``shared`` tensors are taken, not copied."""
        return cls(
            module=cpu_state_copy(module.state_dict(), pin_memory, shared),
            optimizers=[_to_cpu(opt.state_dict(), pin_memory) for opt in optimizers],
            lr_schedulers=[_to_cpu(s.state_dict()) for s in lr_schedulers],
            precision=_to_cpu(precision or {}),
        )


class ReplicaStore:
    """K slots holding the replicas that are not in the live module.

    ``offload="cpu"`` keeps them in CPU memory (page-locked with ``pin_memory=True``, which
    speeds up copies to and from a GPU); ``offload="disk"`` writes each one to
    ``directory/replica_{k}.safetensors`` (module tensors, memory-mapped when read back) plus
    ``replica_{k}.pt`` (optimizer and scheduler states), each written to a temporary name and
    renamed.

    Frozen parameters (``requires_grad=False``: a LoRA model's base, frozen embeddings) are the
    same in every replica: :meth:`share` hands them to the store once, and every slot then
    references those tensors instead of holding a copy (the disk files leave them out).
    A slot whose tensor of a shared name differs from the shared one keeps its own, and the
    name stops being shared (:meth:`unshare`: a parameter unfrozen during the fit).

    Without a ``directory`` a temporary one is made on first use,
    ``$TMPDIR/selmerge-replicas-{host}-{pid}-*``; the store owns it: it is removed by
    :meth:`close`, when the store is garbage-collected, or at interpreter exit (so the replicas
    stay readable after the fit, e.g. ``strategy.replica_states()``). A killed process cannot
    remove it: the next store to make one removes those of dead processes of this host.
    """

    def __init__(
        self,
        num_replicas: int,
        offload: Offload = "cpu",
        pin_memory: bool = False,
        directory: str | Path | None = None,
    ) -> None:
        if offload not in ("cpu", "disk"):
            raise ValueError(f"offload must be 'cpu' or 'disk', got {offload!r}.")
        self.num_replicas = num_replicas
        self.offload = offload
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._directory = Path(directory) if directory is not None else None
        self._own_directory = False
        self._remove_directory: weakref.finalize | None = None
        self._slots: list[ReplicaState | None] = [None] * num_replicas
        self._on_disk = [False] * num_replicas
        self._shared: dict[str, torch.Tensor] = {}  # every tensor ever shared (disk reads)
        self._sharing: set[str] = set()  # the names shared from now on

    def share(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Hold ``tensors`` (CPU; the same in every replica) once for all slots."""
        self._shared = dict(tensors)
        self._sharing = set(tensors)

    def unshare(self, names: Iterable[str]) -> None:
        """Stop sharing ``names`` (slots stored so far keep referencing the shared tensors)."""
        self._sharing.difference_update(names)

    @property
    def shared(self) -> dict[str, torch.Tensor]:
        """The shared tensors by name (the names still shared)."""
        return {name: self._shared[name] for name in self._sharing}

    def shared_bytes(self) -> int:
        """Bytes the shared tensors take once (what each replica no longer copies)."""
        unique = {storage_key(t): t.numel() * t.element_size() for t in self.shared.values()}
        return sum(unique.values())

    def _deduplicate(self, module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``module`` with the shared tensors in place of equal copies (a resumed checkpoint's,
        a merge's); a name whose tensor differs stops being shared."""
        out = dict(module)
        for name in self._sharing & set(module):
            mine, common = module[name], self._shared[name]
            if mine is common or storage_key(mine) == storage_key(common):
                continue
            if mine.shape == common.shape and torch.equal(mine.cpu(), common):
                out[name] = common
            else:
                self.unshare([name])
        return out

    @property
    def directory(self) -> Path:
        """The offload directory (created on first use)."""
        if self._directory is None:
            clean_stale_offload_dirs(tempfile.gettempdir())  # those of killed runs
            prefix = f"{OFFLOAD_PREFIX}{owner_tag()}-"  # the owner, for the next run's cleanup
            self._directory = Path(tempfile.mkdtemp(prefix=prefix))
            self._own_directory = True
            self._remove_directory = weakref.finalize(
                self, shutil.rmtree, str(self._directory), ignore_errors=True
            )
        self._directory.mkdir(parents=True, exist_ok=True)
        return self._directory

    def __getitem__(self, replica: int) -> ReplicaState | None:
        if self._on_disk[replica]:
            return self._read(replica)
        return self._slots[replica]

    def __setitem__(self, replica: int, state: ReplicaState | None) -> None:
        if state is not None and self._sharing:
            module = self._deduplicate(state.module)
            state = ReplicaState(module, state.optimizers, state.lr_schedulers, state.precision)
        if state is None or self.offload == "cpu":
            self._slots[replica] = state
            self._on_disk[replica] = False
            return
        self._write(replica, state)
        self._slots[replica] = None
        self._on_disk[replica] = True

    def clear(self) -> None:
        for replica in range(self.num_replicas):
            self[replica] = None

    def close(self) -> None:
        """Forget every slot and remove a temporary offload directory."""
        self._slots = [None] * self.num_replicas
        self._on_disk = [False] * self.num_replicas
        if self._own_directory and self._remove_directory is not None:
            self._remove_directory()  # removes it now, once
            self._directory, self._own_directory = None, False
            self._remove_directory = None

    # -- disk format ------------------------------------------------------------------------
    def _paths(self, replica: int) -> tuple[Path, Path]:
        stem = self.directory / f"replica_{replica}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".pt")

    def _write(self, replica: int, state: ReplicaState) -> None:
        """Both files go to temporary names first and are renamed only once both are complete,
        so a failure (a full disk) leaves the replica's previous files as they were."""
        tensors_path, rest_path = self._paths(replica)
        unique: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        first_name: dict[tuple, str] = {}
        shared_keys = {storage_key(t): n for n, t in self._shared.items()}
        shared: dict[str, str] = {}  # name -> its shared tensor's name: not written
        for name, tensor in state.module.items():
            key = storage_key(tensor)
            if key in shared_keys:
                shared[name] = shared_keys[key]
            elif key in first_name:
                aliases[name] = first_name[key]
            else:
                first_name[key] = name
                unique[name] = tensor.detach().cpu().contiguous()
        temps = [path.with_name(path.name + ".tmp") for path in (tensors_path, rest_path)]
        metadata = {
            "aliases": json.dumps(aliases),
            "order": json.dumps(list(state.module)),
            "shared": json.dumps(shared),
        }
        try:
            save_file(unique, str(temps[0]), metadata=metadata)
            rest = {
                "optimizers": state.optimizers,
                "lr_schedulers": state.lr_schedulers,
                "precision": state.precision,
            }
            with open(temps[1], "wb") as handle:  # a Python file: a full disk is an OSError
                torch.save(rest, handle)
        except BaseException as err:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            code = _os_errno(err)
            if code is None:
                raise
            size = sum(t.numel() * t.element_size() for t in unique.values()) / 2**20
            raise OSError(
                code,
                f"DataOrderEnsemble(offload='disk'): writing replica {replica}'s state under "
                f"{self.directory} failed: {os.strerror(code)}; its previous files there are "
                f"unchanged. Free space there, point offload_dir at a disk with room (each "
                f"replica needs about {size:.1f} MiB plus its optimizer state) or use "
                "offload='cpu'.",
            ) from err
        for tmp, path in zip(temps, (tensors_path, rest_path)):
            os.replace(tmp, path)

    def _read(self, replica: int) -> ReplicaState:
        tensors_path, rest_path = self._paths(replica)
        mapped = SafetensorsFile(tensors_path)
        unique = {name: mapped.tensor(name) for name in mapped.names()}
        aliases = json.loads(mapped.metadata["aliases"])
        order = json.loads(mapped.metadata["order"])
        shared = json.loads(mapped.metadata.get("shared", "{}"))
        module = {
            name: self._shared[shared[name]] if name in shared else unique[aliases.get(name, name)]
            for name in order
        }
        rest = torch.load(rest_path, map_location="cpu", weights_only=False)
        return ReplicaState(
            module, rest["optimizers"], rest["lr_schedulers"], rest.get("precision", {})
        )


def _os_errno(err: BaseException) -> int | None:
    """The OS error number behind ``err``: its own, that of the exception it came from, or the
    ``(os error N)`` that safetensors' Rust errors carry in their message; ``None`` if none."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        match = re.search(r"os error (\d+)", str(current))
        if match:
            return int(match.group(1))
        current = current.__cause__ or current.__context__
    return None
