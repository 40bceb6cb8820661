"""A full disk while writing: a clear error, no partial output, the previous good output intact.

The disk fills up part-way through a write (some bytes land, then ``ENOSPC``), simulated by
patching the writer; the same code paths were checked against a real full tmpfs.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from ensemble_support import Net, fit
from safetensors.torch import load_file, save_file

from lightning_selmerge.cli import main as cli
from lightning_selmerge.ensemble import DataOrderEnsemble
from lightning_selmerge.ensemble import replica_store as store_module
from lightning_selmerge.ensemble.replica_store import ReplicaState, ReplicaStore
from lightning_selmerge.merging import WeightedAverage, merge_checkpoints
from lightning_selmerge.merging import checkpoints as checkpoints_module
from lightning_selmerge.merging.safetensors_io import ShardedSafetensorsWriter


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def replicas(tmp_path: Path) -> list[Path]:
    paths = []
    for k in range(3):
        gen = torch.Generator().manual_seed(k)
        tensors = {f"layer{i}.weight": torch.randn(64, 32, generator=gen) for i in range(4)}
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file(tensors, paths[-1])
    return paths


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """The writer's ``writes``-th chunk gets half its bytes written, then the disk is full."""
    real_write = ShardedSafetensorsWriter.write
    count = {"n": 0}

    def write(self: ShardedSafetensorsWriter, name: str, chunk: torch.Tensor) -> None:
        count["n"] += 1
        if count["n"] == writes:
            real_write(self, name, chunk.reshape(-1)[: chunk.numel() // 2])
            self._handle.flush()
            raise enospc()
        real_write(self, name, chunk)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", write)


def test_an_oserror_without_errno_is_reported_without_errno_none(
    replicas, tmp_path, monkeypatch
) -> None:
    def write(self, name, chunk):
        raise OSError("the storage went away")

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", write)
    with pytest.raises(OSError, match="merged failed: the storage went away") as caught:
        merge_checkpoints(replicas, tmp_path / "merged")
    assert "Errno" not in str(caught.value) and caught.value.errno is None
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_disk_full_mid_merge_leaves_no_output(replicas, tmp_path, monkeypatch) -> None:
    fill_disk_after(monkeypatch, writes=6)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match=r"merging into .*merged failed: No space left") as caught:
        merge_checkpoints(replicas, out, chunk_numel=500)
    assert caught.value.errno == errno.ENOSPC
    assert "nothing was written to" in str(caught.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_disk_full_with_overwrite_keeps_the_previous_output(replicas, tmp_path, monkeypatch):
    out = merge_checkpoints(replicas, tmp_path / "merged", method=WeightedAverage())
    before = snapshot(out)
    fill_disk_after(monkeypatch, writes=3)
    with pytest.raises(OSError, match=r"No space left.*merged is unchanged"):
        merge_checkpoints(replicas, out, overwrite=True, chunk_numel=1000)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    load_file(out / "model.safetensors")  # still a complete checkpoint


def test_disk_full_copying_side_files_or_provenance_leaves_nothing(replicas, tmp_path, monkeypatch):
    real_write_text = Path.write_text

    def write_text(self: Path, data: str, *args, **kwargs) -> int:
        if self.name == checkpoints_module.PROVENANCE_NAME:
            real_write_text(self, data[:10], *args, **kwargs)
            raise enospc()
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left"):
        merge_checkpoints(replicas, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_failed_final_rename_puts_the_previous_output_back(replicas, tmp_path, monkeypatch):
    out = merge_checkpoints(replicas, tmp_path / "merged", method=WeightedAverage())
    before = snapshot(out)
    real_replace = os.replace

    def replace(src, dst) -> None:
        if Path(src).name.startswith(".merged.tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints_module.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error.*merged is unchanged"):
        merge_checkpoints(replicas, out, overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_cli_reports_a_full_disk_clearly(replicas, tmp_path, monkeypatch, capsys) -> None:
    fill_disk_after(monkeypatch, writes=2)
    out = tmp_path / "merged"
    assert cli(["merge", *map(str, replicas), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-selmerge merge: error: [Errno 28] merging into")
    assert "No space left on device" in err and "nothing was written" in err
    assert err.splitlines()[-1] == "(add --debug or set SELMERGE_DEBUG=1 to see the traceback)"
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []
    fill_disk_after(monkeypatch, writes=2)
    with pytest.raises(OSError, match="No space left on device") as raised:
        cli(["merge", *map(str, replicas), "--out", str(out), "--quiet", "--debug"])
    assert raised.value.errno == errno.ENOSPC
    assert not out.exists() and leftovers(tmp_path) == []


# -- the ensemble's disk offload ---------------------------------------------------------------


def state(value: float) -> ReplicaState:
    weight = torch.full((16, 4), value)
    return ReplicaState(
        {"w": weight, "tied": weight, "b": torch.full((4,), value)},
        optimizers=[{"state": {0: {"exp_avg": torch.full((16, 4), value)}}}],
    )


def partial_then(error: BaseException):
    """A writer standing in for save_file / torch.save: some bytes land, then ``error``."""

    def write(obj, target, *args, **kwargs) -> None:
        if hasattr(target, "write"):
            target.write(b"partial bytes")
        else:
            Path(target).write_bytes(b"partial bytes")
        raise error

    return write


def torch_zip_error() -> RuntimeError:
    """What torch.save into a Python file raises on a full disk: the OSError is its context."""
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
    err.__context__ = enospc()
    return err


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("save_file", enospc()),
        # safetensors reports I/O failures as SafetensorError, the errno only in its message
        ("save_file", Exception("Error while serializing: I/O error: No space left on device "
                                "(os error 28)")),
        ("torch.save", torch_zip_error()),
    ],
    ids=["oserror", "safetensors-error", "torch-zip-error"],
)  # fmt: skip
def test_offload_store_disk_full_keeps_previous_files(tmp_path, monkeypatch, target, error):
    store = ReplicaStore(2, "disk", directory=tmp_path)
    store[1] = state(1.0)
    before = snapshot(tmp_path)
    if target == "save_file":
        monkeypatch.setattr(store_module, "save_file", partial_then(error))
    else:
        monkeypatch.setattr(store_module.torch, "save", partial_then(error))
    with pytest.raises(OSError, match=r"offload='disk'\): writing replica 1's state") as caught:
        store[1] = state(2.0)
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device" in str(caught.value) and "offload='cpu'" in str(caught.value)
    assert snapshot(tmp_path) == before  # no temp file, the previous files untouched
    kept = store[1]
    assert torch.equal(kept.module["w"], torch.full((16, 4), 1.0))
    assert torch.equal(kept.optimizers[0]["state"][0]["exp_avg"], torch.full((16, 4), 1.0))


def test_offload_store_other_errors_pass_through_and_clean_up(tmp_path, monkeypatch) -> None:
    store = ReplicaStore(2, "disk", directory=tmp_path)
    monkeypatch.setattr(store_module, "save_file", partial_then(TypeError("not a tensor")))
    with pytest.raises(TypeError, match="not a tensor"):
        store[0] = state(1.0)
    assert list(tmp_path.iterdir()) == []
    assert store[0] is None


def test_fit_with_disk_offload_stops_on_a_full_disk_with_a_clear_error(tmp_path, monkeypatch):
    real_save_file = store_module.save_file
    calls = {"n": 0}

    def save_file_filling_up(tensors, filename, metadata=None) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second replica switch
            partial_then(enospc())(tensors, filename)
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(store_module, "save_file", save_file_filling_up)
    strategy = DataOrderEnsemble(num_replicas=3, seed=3, offload="disk", offload_dir=str(tmp_path))
    with pytest.raises(OSError, match=r"writing replica 1's state under .*No space left"):
        fit(Net(), 3, strategy=strategy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica_0.pt", "replica_0.safetensors"]
