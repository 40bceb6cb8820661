"""``lightning-selmerge report`` on the TensorBoard logs of a real (tiny) ensemble run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from test_ensemble_monitor import BATCH, Classifier, dataset
from torch.utils.data import DataLoader

from lightning_selmerge.cli import main
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.imbalance import PositionLossMonitor
from lightning_selmerge.report import load_scalars, signed

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class ValClassifier(Classifier):
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.per_sample_loss(batch).mean())


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=2, seed=0),
        callbacks=[PositionLossMonitor(num_segments=4, probe_size=32), SelectionMergeCallback()],
        logger=TensorBoardLogger(root, name="tiny"),
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    loader = DataLoader(dataset(), batch_size=BATCH)
    trainer.fit(ValClassifier(), loader, DataLoader(dataset(), batch_size=20))
    return root


def test_report_writes_figures_and_summary(logdir: Path, capsys: pytest.CaptureFixture) -> None:
    out = logdir / "report"
    assert main(["report", str(logdir), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loss_by_position.png", "spearman.png", "summary.md", "validation.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    run = load_scalars(logdir)
    merged_rho = run.last("imbalance/merged/spearman")
    merged_step = run.last_step("imbalance/merged/spearman")
    assert merged_step == run.last_step("imbalance/replica_0/spearman")  # the last epoch merged
    assert f"| merged | {merged_step} | {signed(merged_rho)} |" in summary
    assert f"| merged | {run.last('val_loss'):.4f} |" in summary
    for k in range(2):
        assert f"| replica_{k} | {run.last(f'replica_{k}/val_loss'):.4f} |" in summary
    assert "Merged minus mean of replicas" in capsys.readouterr().out


def test_report_without_logs_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_names_a_missing_metric(logdir: Path, tmp_path: Path) -> None:
    # the imbalance figures still come out; the validation figure needs the named metric
    assert main(["report", str(logdir), "--out", str(tmp_path), "--metric", "val_acc"]) == 0
    assert not (tmp_path / "validation.png").exists()
    assert (tmp_path / "loss_by_position.png").exists()


@pytest.mark.parametrize("metric, mode, best", [("val_acc", None, 0.9), ("val_acc", "min", 0.7)])
def test_best_replica_follows_the_metric_direction(
    tmp_path: Path, metric: str, mode: str | None, best: float
) -> None:
    """Higher is better for an accuracy (inferred from its name), unless told otherwise."""
    logger = TensorBoardLogger(tmp_path, name="r", version=0)
    for step, (merged, r0, r1) in enumerate([(0.5, 0.4, 0.6), (0.8, 0.7, 0.9)]):
        logger.log_metrics(
            {metric: merged, f"replica_0/{metric}": r0, f"replica_1/{metric}": r1}, step=step
        )
    logger.finalize("success")
    argv = ["report", str(tmp_path), "--out", str(tmp_path / "out"), "--metric", metric]
    assert main(argv + (["--mode", mode] if mode else [])) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"merged minus best replica: {0.8 - best:+.4f}" in summary


def test_a_newer_run_that_logged_nothing_is_passed_over(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A fit that failed in setup leaves a newer version directory with an empty events file:
    the report is of the newest run that logged scalars, and a tree of empty runs is named."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    tree = tmp_path / "runs"
    shutil.copytree(logdir, tree)
    good = load_scalars(tree).directory
    empty = good.parent / "version_99"
    SummaryWriter(str(empty)).close()
    assert list(empty.glob("events.out.tfevents.*"))
    assert load_scalars(tree).directory == good
    with SummaryWriter(str(good.parent / "version_100")) as writer:  # a later `validate`
        writer.add_scalar("val_loss", 1.0, 0)
    assert load_scalars(tree).directory == good
    only_empty = tmp_path / "failed"
    SummaryWriter(str(only_empty / "version_0")).close()
    assert main(["report", str(only_empty)]) == 2
    assert "no scalars in the TensorBoard logs" in capsys.readouterr().err


def test_a_monitor_tag_prefix_is_reported_when_named(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A PositionLossMonitor(tag_prefix="probe/pos") run: `--tag_prefix probe/pos` reports it;
    without it the report names the flag."""
    logger = TensorBoardLogger(tmp_path, name="r", version=0)
    for step in (1, 2):
        scalars = {f"probe/pos/segment_{s}_loss": 1.0 + s / step for s in range(3)}
        scalars |= {"probe/pos/spearman": -0.5 / step, "probe/pos/mean_loss": 2.0 / step}
        logger.log_metrics(scalars, step=step)
    logger.finalize("success")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "none")]) == 2
    assert "--tag_prefix" in capsys.readouterr().err
    argv = ["report", str(tmp_path), "--out", str(tmp_path / "out"), "--tag_prefix", "probe/pos"]
    assert main(argv) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"| model | 2 | {signed(-0.25)} | 1.0000 | 1.0000 | 2.0000 |" in summary
    assert (tmp_path / "out" / "spearman.png").exists()
