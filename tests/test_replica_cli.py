"""``lightning-selmerge fit --replica k --num_replicas K --snapshot_dir DIR`` on the demo."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lightning_selmerge.cli import main
from lightning_selmerge.cli.replica import ReplicaJobRefused
from lightning_selmerge.merging import ParameterSelection, merge_checkpoints

warnings.filterwarnings("ignore", ".*does not have many workers.*")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TINY = [
    f"--data.init_args.data_files={ROOT / 'examples/data/chatterbot_pairs.jsonl'}",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.callbacks.probe_size=16",  # the demo's PositionLossMonitor, on a small probe
]


def fit(*args: str) -> int:
    return main(["fit", "--config", str(DEMO), *TINY, *args])


def refused(capsys: pytest.CaptureFixture, *args: str, command: str = "fit") -> str:
    """The error line of a refused replica job, after checking the hint line that follows."""
    assert main([command, "--config", str(DEMO), *TINY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "(add --debug or set SELMERGE_DEBUG=1 to see the traceback)", err
    assert err[-2].startswith(f"lightning-selmerge {command}: error: "), err
    return err[-2]


def test_demo_config_runs_as_replica_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert fit("--replica", "1", "--num_replicas", "2", "--snapshot_dir", "snaps") == 0
    note = capsys.readouterr().err
    assert (
        "lightning-selmerge merge --epoch_dir snaps/epoch_NNN --base snaps/initial --method "
        "selection --resample 1 --out merged/epoch_NNN" in note
    )
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")  # --replica from the job array
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # as the README's job script runs it: its first start has no last.ckpt yet
        assert fit("--num_replicas", "2", "--snapshot_dir", "snaps", "--ckpt_path", "last") == 0
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if "no last checkpoint" in m or "LeafSpec" in m], shown
    epoch = tmp_path / "snaps" / "epoch_000"
    for replica in range(2):
        record = json.loads((epoch / f"replica_{replica:03d}" / "selmerge.json").read_text())
        assert (record["replica"], record["num_replicas"], record["seed"]) == (replica, 2, 0)
        logs = tmp_path / "runs" / "demo" / f"replica_{replica:03d}"  # one TensorBoard tree
        saved = sorted(p.name for p in (logs / "checkpoints").iterdir())
        assert saved == ["epoch=0-step=1.ckpt", "last.ckpt"]  # saved at each epoch's end
        assert (logs / "checkpoints" / "last.ckpt").is_symlink()  # one training state on disk
        saved = yaml.safe_load((logs / "config.yaml").read_text())
        assert saved["trainer"]["strategy"]["class_path"].endswith("DataOrderEnsemble")
    assert (tmp_path / "snaps" / "initial" / "config.json").is_file()
    out = merge_checkpoints(
        [epoch / "replica_000", epoch / "replica_001"],
        tmp_path / "merged",
        method=ParameterSelection(resample=1),
        base=tmp_path / "snaps" / "initial",
    )
    assert load_file(out / "model.safetensors")
    # a requeued job resumes from its own last.ckpt (here: the fit is already complete)
    assert fit("--num_replicas", "2", "--snapshot_dir", "snaps", "--ckpt_path", "last") == 0
    # the report takes the K jobs' runs together: one row (and curve) per replica
    assert main(["report", "runs/demo", "--out", "report"]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    for k in range(2):
        assert f"| replica_{k} | " in summary
    assert "| merged |" not in summary and "replica jobs are merged after they end" in summary
    assert (tmp_path / "report" / "loss_by_position.png").is_file()


def test_the_jobs_merge_note_is_a_command_that_merges_as_the_callback_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A method given as an object becomes its name and parameters, nonfinite="drop" becomes
    --drop_nonfinite; the printed flags parse into the callback's method."""
    from lightning_selmerge.cli.merge import merge_parser, method_from_args
    from lightning_selmerge.merging import TaskArithmetic

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(DEMO.read_text())
    callback = config["trainer"]["callbacks"][0]["init_args"]
    callback.pop("resample", None)
    callback["method"] = {
        "class_path": "lightning_selmerge.merging.TaskArithmetic",
        "init_args": {"scale": 0.5},
    }
    callback["nonfinite"] = "drop"
    (tmp_path / "ta.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", "ta.yaml", *TINY, "--replica", "0", "--num_replicas", "2"]
    assert main([*args, "--snapshot_dir", "s"]) == 0
    note = next(line for line in capsys.readouterr().err.splitlines() if "replica job:" in line)
    command = note.split("lightning-selmerge merge ", 1)[1].split()
    assert "--drop_nonfinite" in command and "Namespace" not in note
    parsed = merge_parser().parse_args(command)
    assert method_from_args(parsed) == TaskArithmetic(scale=0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_replicas", "4", "--snapshot_dir", "s"], "needs --replica k (0 .. K-1), or $SLUR"),
        (["--replica", "4", "--snapshot_dir", "s"], "--replica 4 is not one of the 4 replicas"),
        (["--replica", "-1", "--snapshot_dir", "s"], "--replica -1 is not one of the 4"),
        (["--replica", "0", "--num_replicas", "1", "--snapshot_dir", "s"], "num_replicas=1"),
        (["--replica", "0"], "needs --snapshot_dir DIR"),
        (["--replica", "0", "--snapshot_dir", "s", "--seed_everything", "true"], "one int seed"),
    ],
)
def test_bad_replica_flags(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert message in refused(capsys, *args)
    assert not (tmp_path / "s").exists()


def test_sync_replicas_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(DEMO.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["sync_replicas"] = True
    (tmp_path / "sync.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", "sync.yaml", *TINY, "--replica", "0", "--snapshot_dir", "s"]
    assert main(args) == 2
    assert "sync_replicas=True) resets every replica" in capsys.readouterr().err
    with pytest.raises(ReplicaJobRefused, match="sync_replicas=True"):
        main([*args, "--debug"])


def test_replica_flags_are_for_fit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, "--replica", "0", "--snapshot_dir", "s", command="validate")
    assert "--replica is for 'fit' (a replica job trains); not for 'validate'" in err


def test_snapshot_dir_of_another_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    epoch = tmp_path / "s" / "epoch_000"
    epoch.mkdir(parents=True)
    record = {"num_replicas": 4, "seed": 7, "epoch": 0, "fixed_batches": False}
    (epoch / "selmerge.json").write_text(json.dumps(record))
    err = refused(capsys, "--replica", "0", "--snapshot_dir", "s")
    assert "written by another run: seed=7 where this job has seed=0" in err
