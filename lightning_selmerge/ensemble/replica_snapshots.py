"""Per-epoch weight snapshots of replica jobs: where they go, what they record, how they are
written (atomically) and checked.

Layout of a ``snapshot_dir`` filled by the K jobs of one run::

    snapshot_dir/initial/ or initial.safetensors     # the weights every replica starts from
    snapshot_dir/epoch_000/selmerge.json             # {num_replicas, seed, epoch, ...}
    snapshot_dir/epoch_000/replica_000/              # save_pretrained directory + selmerge.json
    snapshot_dir/epoch_000/replica_001.safetensors   # or one file; its record in the metadata

A snapshot is a Hugging Face directory when the LightningModule keeps a ``PreTrainedModel`` as
``self.model`` and has no other tensors; else the whole LightningModule state dict in one
safetensors file (tensors that share memory, i.e. tied weights, stored once under the group's
canonical name, :func:`~lightning_selmerge.merging.ties.canonical_name`, which keys the in-process
merge's draws and for Hugging Face style models is the input embedding that ``save_pretrained``
keeps). A PEFT model (LoRA) is snapshot as a file of its trained tensors
only: its ``save_pretrained`` writes an adapter directory, which the merge does not read, and
its frozen base is the same in every replica. This module imports no Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lightning_selmerge.merging.checkpoints import publish_directory
from lightning_selmerge.merging.errors import MergeError
from lightning_selmerge.merging.leftovers import staging_path
from lightning_selmerge.merging.snapshot_records import (
    METADATA_KEY,
    RECORD_NAME,
    recipe_differences,
)
from lightning_selmerge.merging.snapshot_records import read_record as snapshot_record
from lightning_selmerge.merging.ties import tie_groups

__all__ = [
    "RECORD_FORMAT",
    "RECORD_NAME",
    "SnapshotMismatch",
    "check_snapshot_dir",
    "epoch_dir",
    "find_snapshot",
    "pretrained_model",
    "read_record",
    "remove_stale_temporaries",
    "snapshot_tensors",
    "state_fingerprint",
    "write_epoch_record",
    "write_snapshot",
]

RECORD_FORMAT = "lightning_selmerge.replica_snapshot"
#: where a save_pretrained snapshot's tensors sit in the LightningModule (``self.model``): a
#: record's ``draw_prefix``, so that the merge draws under the names the in-process merge uses
PRETRAINED_PREFIX = "model."
#: the keys every record of one run must agree on
RUN_KEYS = ("num_replicas", "seed", "fixed_batches")
_EPOCH = re.compile(r"^epoch_(\d{3,})$")


class SnapshotMismatch(ValueError):
    """A ``snapshot_dir`` holds snapshots of another run (another K, seed or initial model)."""


def epoch_dir(snapshot_dir: str | Path, epoch: int) -> Path:
    """``snapshot_dir/epoch_{epoch:03d}``.

    Example:
        >>> epoch_dir("snaps", 2).as_posix()
        'snaps/epoch_002'
    """
    return Path(snapshot_dir) / f"epoch_{epoch:03d}"


def pretrained_model(module: torch.nn.Module, state: Mapping[str, Any]) -> Any | None:
    """``module.model`` when it has ``save_pretrained``, holds every tensor of ``state`` and is
    no PEFT model (whose ``save_pretrained`` writes the adapters only)."""
    model = getattr(module, "model", None)
    if not callable(getattr(model, "save_pretrained", None)) or _is_peft_model(model):
        return None
    if any(not name.startswith(PRETRAINED_PREFIX) for name in state):
        return None
    return model


def _is_peft_model(model: Any) -> bool:
    """A ``peft.PeftModel``, or a transformers model with PEFT adapters loaded."""
    return getattr(model, "peft_config", None) is not None


def snapshot_tensors(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """What a snapshot of ``module`` holds: ``state``, less the frozen parameters
    (``requires_grad=False``) when ``module.model`` is a PEFT model: its base is the same in
    every replica, and K copies of it would defeat LoRA (the merge takes it as it is)."""
    if not _is_peft_model(getattr(module, "model", None)):
        return state
    frozen = {
        name
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if not parameter.requires_grad
    }
    return {name: tensor for name, tensor in state.items() if name not in frozen}


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """BLAKE2b of every tensor's name, dtype, shape and bytes, in name order (hex, 32 chars).

    Example:
        >>> a = {"w": torch.zeros(2)}
        >>> state_fingerprint(a) == state_fingerprint({"w": torch.zeros(2)})
        True
        >>> state_fingerprint(a) == state_fingerprint({"w": torch.ones(2)})
        False
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\x1f{tensor.dtype}\x1f{tuple(tensor.shape)}\x1e".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tie group (shared memory) once, under its canonical name (the
    one the merge keys its draws by in memory; the state dict's first name may differ)."""
    return {name: state[name].detach().to("cpu").contiguous() for name in tie_groups(state)}


def _write_json_atomic(path: Path, record: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_snapshot(
    target: Path,
    state: Mapping[str, torch.Tensor],
    record: Mapping[str, Any],
    pretrained: Any | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Write ``state`` as ``target/`` (``pretrained.save_pretrained``, with ``tokenizer`` and
    ``selmerge.json``) or as ``target.safetensors`` (``record`` in its metadata), under a
    temporary name renamed when complete: an existing snapshot is replaced whole or not at all.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "replica_000"
        >>> write_snapshot(out, {"w": torch.ones(2)}, {"replica": 0}).name
        'replica_000.safetensors'
        >>> read_record(out.with_suffix(".safetensors"))
        {'replica': 0}
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if pretrained is None:
        path = target.with_name(target.name + ".safetensors")
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            metadata = {METADATA_KEY: json.dumps(dict(record), sort_keys=True)}
            save_file(_file_tensors(state), str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
    tmp_dir = staging_path(target)  # made with the umask's permissions (mkdtemp: owner only)
    tmp_dir.mkdir()
    try:
        inner = {name[len(PRETRAINED_PREFIX) :]: tensor for name, tensor in state.items()}
        from lightning_selmerge.hf.export import write_pretrained_files

        write_pretrained_files(pretrained, tokenizer, tmp_dir, inner)
        (tmp_dir / RECORD_NAME).write_text(json.dumps(dict(record), indent=2, sort_keys=True))
        publish_directory(tmp_dir, target, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return target


def write_epoch_record(directory: Path, record: Mapping[str, Any]) -> None:
    """``directory/selmerge.json`` with what every job of the run shares (rewritten only when
    it differs)."""
    path = directory / RECORD_NAME
    if path.is_file():
        try:
            if json.loads(path.read_text()) == dict(record):
                return
        except ValueError:
            pass
    directory.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, record)


def find_snapshot(target: Path) -> Path | None:
    """The snapshot written for ``target`` (the directory or the ``.safetensors`` file)."""
    if target.is_dir():
        return target
    file = target.with_name(target.name + ".safetensors")
    return file if file.is_file() else None


def read_record(snapshot: Path) -> dict[str, Any] | None:
    """The record of a snapshot directory, safetensors file or ``selmerge.json`` (``None`` when
    it has none): :func:`lightning_selmerge.merging.snapshot_records.read_record`, its errors as
    :class:`SnapshotMismatch`."""
    try:
        return snapshot_record(snapshot)
    except MergeError as err:
        raise SnapshotMismatch(f"cannot read the snapshot record: {err}") from err


def _records(snapshot_dir: Path) -> dict[Path, dict[str, Any]]:
    """Every record under ``snapshot_dir``: the initial snapshot's, the epochs' and replicas'."""
    found: dict[Path, dict[str, Any]] = {}
    candidates = [snapshot_dir / "initial", snapshot_dir / "initial.safetensors"]
    for epoch in sorted(p for p in snapshot_dir.iterdir() if _EPOCH.match(p.name) and p.is_dir()):
        candidates.append(epoch / RECORD_NAME)
        candidates += sorted(p for p in epoch.iterdir() if p.name.startswith("replica_"))
    for path in candidates:
        if path.exists():
            record = read_record(path)
            if record is not None:
                found[path] = record
    return found


def check_snapshot_dir(snapshot_dir: str | Path, run: Mapping[str, Any]) -> None:
    """Refuse a ``snapshot_dir`` holding snapshots whose records disagree with ``run`` (its
    ``num_replicas``, ``seed``, ``fixed_batches`` and, when given, ``initial_fingerprint`` and
    ``recipe``, see :mod:`~lightning_selmerge.ensemble.recipe`).

    Raises:
        SnapshotMismatch: naming the snapshot, the values and the fix.
    """
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        return
    keys = [*RUN_KEYS, "initial_fingerprint"]
    for path, record in _records(snapshot_dir).items():
        for key in keys:
            if run.get(key) is None or record.get(key) is None or record[key] == run[key]:
                continue
            what = (
                "another initial model (the jobs must build identical weights: set the same "
                "seed_everything in every job and load the same checkpoint)"
                if key == "initial_fingerprint"
                else f"{key}={record[key]!r} where this job has {key}={run[key]!r}"
            )
            raise SnapshotMismatch(
                f"ReplicaJob: {path} in the snapshot_dir was written by another run: {what}. "
                "Use a new snapshot_dir for this run, or the settings of the run that wrote it."
            )
        differences = ""
        if run.get("recipe") is not None and record.get("recipe") is not None:
            differences = recipe_differences(record["recipe"], run["recipe"])
        if differences:
            raise SnapshotMismatch(
                f"ReplicaJob: {path} in the snapshot_dir was written by a job with other "
                f"settings ({differences}; recorded vs this job's). The K jobs of a run share "
                "one config (only the replica index differs): start this job with the "
                "recorded settings; if this job's are the intended ones, the job that wrote "
                f"{path.name} is the odd one: delete what it wrote (its replica's snapshots, "
                "and its checkpoint) and rerun it; or use a new snapshot_dir."
            )


def remove_stale_temporaries(snapshot_dir: str | Path, replica: int) -> list[Path]:
    """Remove the temporary files of ``replica``'s job left by a killed write (only this job
    writes those names), and return them."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        return []
    stem = re.escape(f"replica_{replica:03d}")
    pattern = re.compile(rf"^\.{stem}(\.safetensors)?\.tmp-")
    candidates = [
        stale
        for epoch in snapshot_dir.iterdir()
        if _EPOCH.match(epoch.name) and epoch.is_dir()
        for stale in epoch.iterdir()
        if pattern.match(stale.name)
    ]
    if replica == 0:  # replica 0's job writes the initial weights too
        initial = re.compile(r"^\.initial(\.safetensors)?\.tmp-")
        candidates += [p for p in snapshot_dir.iterdir() if initial.match(p.name)]
    for stale in candidates:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return candidates
