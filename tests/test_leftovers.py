"""What killed runs leave behind (staging directories, half-done --overwrite swaps, temporary
checkpoint files, offload directories) is recovered or removed by the next run in the same place."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from ensemble_support import Net, child_env, fit
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from lightning_selmerge.cli import main as cli
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.merging import MergeError, WeightedAverage, merge_checkpoints
from lightning_selmerge.merging.leftovers import clean_stale_files

warnings.filterwarnings("ignore", ".*does not have many workers.*")

REPO = Path(__file__).resolve().parents[1]
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def dead_pid() -> int:
    """The id of a process of this host that has certainly ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def replicas(tmp_path: Path) -> list[Path]:
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file({"w": torch.full((4,), float(k))}, paths[-1])
    return paths


KILL_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from lightning_selmerge.merging import merge_checkpoints, WeightedAverage
    out = Path(sys.argv[1])
    real = os.replace
    def replace(src, dst):
        if Path(src).name.startswith(f".{out.name}.tmp-") and Path(dst) == out:
            os._exit(9)  # killed between renaming OUT aside and the new output into place
        real(src, dst)
    os.replace = replace
    merge_checkpoints(sys.argv[2:], out, method=WeightedAverage([1.0, 3.0]), overwrite=True)
    """
)


def kill_between_the_renames(tmp_path: Path, out: Path, paths: list[Path]) -> None:
    code = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out), *map(str, paths)],
        env=child_env(REPO),
        capture_output=True,
        text=True,
    )
    assert code.returncode == 9, code.stderr
    assert not out.exists()  # the window: OUT renamed aside, the new one not yet in place
    names = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".m."))
    assert names == [".m.old", ".m.tmp"]


@pytest.mark.parametrize("staging_survived", [True, False])
def test_a_kill_inside_the_overwrite_window_is_recovered_by_the_next_run(
    tmp_path: Path, staging_survived: bool
) -> None:
    paths = replicas(tmp_path)
    out = tmp_path / "m"
    merge_checkpoints(paths, out, method=WeightedAverage())  # the old output: 0.5 everywhere
    kill_between_the_renames(tmp_path, out, paths)
    if not staging_survived:  # someone deleted the complete new output: put the old one back
        for path in tmp_path.glob(".m.tmp-*"):
            for item in path.iterdir():
                item.unlink()
            path.rmdir()
    recovered = pytest.warns(UserWarning, match="recovered what a killed run left beside")
    with recovered, pytest.raises(MergeError, match="already exists"):  # no --overwrite now
        merge_checkpoints(paths, out, method=WeightedAverage())
    want = 0.75 if staging_survived else 0.5  # the killed run's complete merge, or the old one
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.full((4,), want))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r0.safetensors", "r1.safetensors"]


def test_the_cli_recovers_the_overwrite_window_too(tmp_path: Path, capsys) -> None:
    paths = replicas(tmp_path)
    out = tmp_path / "m"
    merge_checkpoints(paths, out, method=WeightedAverage())
    kill_between_the_renames(tmp_path, out, paths)
    argv = ["merge", *map(str, paths), "--method", "average", "--out", str(out), "--quiet"]
    with pytest.warns(UserWarning, match="finished replacing"):
        assert cli([*argv, "--overwrite"]) == 0
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.full((4,), 0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r0.safetensors", "r1.safetensors"]


def test_a_killed_merges_staging_directory_is_removed_by_the_next_merge(tmp_path: Path) -> None:
    paths = replicas(tmp_path)
    stale = tmp_path / f".m.tmp-0123abcd-{HOST}-{dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 2048)
    unknown = tmp_path / ".m.tmp-89abcdef"  # an older version's name: the owner is unknown
    unknown.mkdir()
    (unknown / "model.safetensors").write_bytes(b"\0" * 4096)
    with pytest.warns(UserWarning) as record:
        merge_checkpoints(paths, tmp_path / "m", method=WeightedAverage())
    messages = " ".join(str(w.message) for w in record)
    assert f"removed {stale} (0.0 MiB)" in messages
    assert f"{unknown} (0.0 MiB)" in messages and "possibly still running" in messages
    assert not stale.exists() and unknown.exists()


def test_stale_checkpoint_temp_files_and_offload_dirs_are_cleaned_by_the_next_fit(
    tmp_path: Path, monkeypatch
) -> None:
    ckpts, tmpdir = tmp_path / "ckpts", tmp_path / "tmp"
    ckpts.mkdir()
    tmpdir.mkdir()
    pid = dead_pid()
    stale_ckpt = ckpts / f".last.ckpt.tmp-0123abcd-{HOST}-{pid}"
    stale_ckpt.write_bytes(b"\0" * 100)
    old_style = ckpts / ".last.ckpt.tmp-89abcdef"
    old_style.write_bytes(b"\0" * 100)
    stale_offload = tmpdir / f"selmerge-replicas-{HOST}-{pid}-x1y2z3"
    stale_offload.mkdir()
    (stale_offload / "replica_0.safetensors").write_bytes(b"\0" * 100)
    live_offload = tmpdir / f"selmerge-replicas-{HOST}-1-abc"  # pid 1 is alive
    live_offload.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    strategy = DataOrderEnsemble(num_replicas=2, seed=3, offload="disk")
    saver = ModelCheckpoint(dirpath=ckpts, save_last=True)
    with pytest.warns(UserWarning) as record:
        fit(
            Net(),
            2,
            1,
            [SelectionMergeCallback(), saver],
            strategy=strategy,
            enable_checkpointing=True,
            limit_train_batches=2,
        )
    messages = " ".join(str(w.message) for w in record)
    assert not stale_ckpt.exists() and f"{stale_ckpt} (0.0 MiB)" in messages
    assert old_style.exists() and f"{old_style} (0.0 MiB)" in messages
    assert not stale_offload.exists() and f"{stale_offload} (0.0 MiB)" in messages
    assert live_offload.exists() and str(live_offload) not in messages
    own = [p for p in tmpdir.iterdir() if p not in (live_offload,)]
    assert len(own) == 1 and own[0].name.startswith(f"selmerge-replicas-{HOST}-")


def test_a_live_process_of_this_host_is_at_work_and_another_hosts_unknown(tmp_path: Path) -> None:
    """Beside a checkpoint, a temporary file of a live process on this host (another rank of the
    same run, say) is neither removed nor warned about; one of another host may be dead or not,
    and is named."""
    live = tmp_path / f".last.ckpt.tmp-0123abcd-{HOST}-1"  # pid 1 is alive
    elsewhere = tmp_path / ".last.ckpt.tmp-0123abcd-ffffff-4242"
    for path in (live, elsewhere):
        path.write_bytes(b"\0" * 100)
    with pytest.warns(UserWarning) as record:
        assert clean_stale_files(tmp_path) == []
    messages = " ".join(str(w.message) for w in record)
    assert str(elsewhere) in messages and str(live) not in messages
    assert live.exists() and elsewhere.exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_an_output_that_is_holds_or_sits_in_an_input_is_refused(
    tmp_path: Path, streaming: bool
) -> None:
    """--overwrite onto an input would delete it (or mix the output into it)."""
    from lightning_selmerge.merging import merge_checkpoints_streaming

    merge = merge_checkpoints_streaming if streaming else merge_checkpoints
    paths = replicas(tmp_path)
    before = {p: p.read_bytes() for p in paths}
    for out, relation in [(paths[0], "is"), (tmp_path, "holds")]:
        with pytest.raises(MergeError, match=f"output .* {relation} the input"):
            merge(paths, out, method=WeightedAverage(), overwrite=True)
    model = tmp_path / "m"
    merge(paths, model, method=WeightedAverage())
    with pytest.raises(MergeError, match="is inside the input"):
        merge(paths, model / "again", method=WeightedAverage(), base=model)
    assert {p: p.read_bytes() for p in paths} == before


def test_overwriting_a_file_leaves_no_backup(tmp_path: Path) -> None:
    paths = replicas(tmp_path)
    out = tmp_path / "afile"
    out.write_text("x")
    merge_checkpoints(paths, out, method=WeightedAverage(), overwrite=True)
    assert out.is_dir() and not list(tmp_path.glob(".afile.*"))


@pytest.mark.parametrize(
    ("method", "streaming"),
    [
        ("ties", False),  # TIES has no streaming form
        *((m, s) for m in ("dare", "task_arithmetic", "task_arithmetic_select") for s in (0, 1)),
    ],
)
def test_a_base_holding_nan_is_refused_where_task_vectors_are_taken(
    tmp_path: Path, method: str, streaming: bool
) -> None:
    from lightning_selmerge.merging import (
        Dare,
        TaskArithmetic,
        TiesMerging,
        merge_checkpoints_streaming,
    )

    merge = merge_checkpoints_streaming if streaming else merge_checkpoints
    chosen = {
        "ties": TiesMerging(),
        "dare": Dare(),
        "task_arithmetic": TaskArithmetic(),
        "task_arithmetic_select": TaskArithmetic(combine="selection"),
    }[method]
    paths = replicas(tmp_path)
    base = tmp_path / "base.safetensors"
    save_file({"w": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, base)
    with pytest.raises(MergeError, match=r"tensor 'w': the base holds NaN or Inf \(flat index 1\)"):
        merge(paths, tmp_path / "m", method=chosen, base=base)
    assert not (tmp_path / "m").exists()
