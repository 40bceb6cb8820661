"""What a CLI fit shows: the TensorBoard tags the README documents, integer counters in the
progress bar, one training-loss curve per replica, and no Lightning "💡 Tip" lines."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
from ensemble_support import Net, fit
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_selmerge.cli import main
from lightning_selmerge.cli.train import SelmergeCLI
from lightning_selmerge.ensemble import SelectionMergeCallback
from lightning_selmerge.progress import SelmergeRichProgressBar, SelmergeTQDMProgressBar

warnings.filterwarnings("ignore", ".*does not have many workers.*")

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")
DATA = f"--data.init_args.data_files={ROOT / 'examples/data/chatterbot_pairs.jsonl'}"
SHORT = [  # a demo-like run: K=4, 1 epoch of 2 steps per replica, every step logged
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
]


def documented_tags() -> tuple[list[re.Pattern], list[re.Pattern]]:
    """(scalar, image) tag patterns of the README's TensorBoard table (first column)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## TensorBoard", 1)[1].split("\n## ", 1)[0]
    scalars, images = [], []
    for row in re.findall(r"^\| (.+?) \| .+ \|$", section, re.MULTILINE):
        if row in ("tag", "---"):
            continue
        for name in re.findall(r"`([^`]+)`", row):
            pattern = re.escape(name).replace("_k/", r"_\d+/").replace("SS", r"\d\d")
            (images if "(image)" in row else scalars).append(re.compile(pattern + "$"))
    return scalars, images


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[EventAccumulator, str]:
    root = tmp_path_factory.mktemp("demo")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(root)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        assert main(["fit", "--config", DEMO, DATA, *SHORT]) == 0
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous)
        monkeypatch.undo()
    (logdir,) = (root / "runs" / "demo").glob("version_*")
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events, "\n".join(records)


def test_the_readme_documents_exactly_the_tags_a_demo_run_writes(demo_run) -> None:
    events, _ = demo_run
    written = set(events.Tags()["scalars"])
    scalars, images = documented_tags()
    assert scalars and images
    undocumented = {tag for tag in written if not any(p.match(tag) for p in scalars)}
    assert not undocumented, f"tags written but not in the README's table: {undocumented}"
    unwritten = [p.pattern for p in scalars if not any(p.match(tag) for tag in written)]
    assert not unwritten, f"tags in the README's table that the demo does not write: {unwritten}"
    assert all(any(p.match(tag) for tag in events.Tags()["images"]) for p in images)


def test_training_loss_is_logged_per_replica_only(demo_run) -> None:
    events, _ = demo_run
    tags = set(events.Tags()["scalars"])
    assert "train_loss" not in tags  # the interleaved sawtooth stays in the progress bar
    steps = {k: [e.step for e in events.Scalars(f"replica_{k}/train_loss_step")] for k in range(4)}
    assert steps == {k: [2 * k + 1, 2 * k + 2] for k in range(4)}  # each replica its own steps
    assert all(f"replica_{k}/train_loss" in tags for k in range(4))


def test_no_lightning_tips(demo_run, caplog: pytest.LogCaptureFixture) -> None:
    _, logged = demo_run
    assert "GPU available" in logged  # Lightning's other messages are kept
    assert "💡 Tip" not in logged
    caplog.set_level(logging.INFO)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)  # outside the CLI...
    assert "💡 Tip" in caplog.text  # ...Lightning does print them


def cli_trainer(*args: str) -> Trainer:
    cli = SelmergeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", DEMO, DATA, "--trainer.logger=false", *args],
        run=False,
    )
    return cli.trainer


def test_the_cli_progress_bar_shows_integer_counters(tmp_path: Path) -> None:
    assert isinstance(cli_trainer().progress_bar_callback, SelmergeRichProgressBar)
    assert cli_trainer("--trainer.enable_progress_bar=false").progress_bar_callback is None
    configured = cli_trainer("--trainer.callbacks+=TQDMProgressBar").progress_bar_callback
    assert type(configured) is TQDMProgressBar  # the user's choice is kept

    shown = {}

    class Peek(SelmergeTQDMProgressBar):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            super().on_train_batch_end(trainer, pl_module, *args)
            shown.update(self.get_metrics(trainer, pl_module))

    fit(
        Net(),
        2,
        callbacks=[SelectionMergeCallback(), Peek()],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=True,
    )
    assert shown["v_num"] == "0" and shown["replica"] == "1"


def test_a_named_version_shows_whole_in_the_bar(tmp_path: Path) -> None:
    """A replica job logs to version ``replica_003``: the bar shows it, not Lightning's last four
    characters (``_003``)."""
    shown = {}

    class Peek(SelmergeTQDMProgressBar):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            super().on_train_batch_end(trainer, pl_module, *args)
            shown.update(self.get_metrics(trainer, pl_module))

    logger = TensorBoardLogger(tmp_path, version="replica_003")
    fit(Net(), 2, callbacks=[Peek()], logger=logger, enable_progress_bar=True)
    assert shown["v_num"] == "replica_003"
