"""A user mistake on the command line: one or two lines naming the problem and the fix, exit 2.

``--debug`` (or ``SELMERGE_DEBUG=1``) raises the exception instead, with its traceback; called from
Python, the library raises the typed exception.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_selmerge.cli import main
from lightning_selmerge.cli.errors import is_user_mistake, user_message
from lightning_selmerge.ensemble import DataOrderEnsemble
from lightning_selmerge.hf import SFTDataModule
from lightning_selmerge.merging import MergeError
from lightning_selmerge.report import ReportError

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")
DATA = f"--data.init_args.data_files={ROOT / 'examples/data/chatterbot_pairs.jsonl'}"
FIT = ["fit", "--config", DEMO, DATA, "--trainer.logger=false"]


def one_error(capsys: pytest.CaptureFixture, command: str) -> str:
    """The error line of a refused command, after checking the shape of what was printed."""
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith(f"lightning-selmerge {command}: error:")]
    assert len(lines) == 1, err
    after = err[err.index(lines[0]) + 1 :]
    assert after in ([], ["(add --debug or set SELMERGE_DEBUG=1 to see the traceback)"]), err
    assert not any("Traceback" in line for line in err)
    return lines[0]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SELMERGE_DEBUG", raising=False)


def test_one_replica_names_the_fix(capsys: pytest.CaptureFixture) -> None:
    assert main([*FIT, "--trainer.strategy.init_args.num_replicas=1"]) == 2
    line = one_error(capsys, "fit")
    assert "num_replicas=1 trains a single model; use num_replicas >= 2" in line
    assert "Union subtypes" not in line and "Namespace(" not in line


def test_a_missing_data_file_is_named_before_the_trainer_is_built(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main([*FIT, "--data.init_args.data_files=nope.jsonl"]) == 2
    line = one_error(capsys, "fit")
    assert "data file 'nope.jsonl' does not exist" in line
    assert "--data.init_args.data_files=PATH" in line
    # Python callers get the typed exception, from the constructor (before any Trainer)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        SFTDataModule(data_files="nope.jsonl")
    with pytest.raises(FileNotFoundError, match="val_data_files"):
        SFTDataModule(data_files=DATA.split("=", 1)[1], val_data_files="val/*.jsonl")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--trainer.max_epochs=abc", "trainer.max_epochs: got 'abc', expected one of: int, None"),
        ("--trainer.no_such_option=1", "unrecognized arguments: --trainer.no_such_option=1"),
        ("--model.init_args.learning_rate=-1", "CausalLMModule: learning_rate=-1.0 must be > 0"),
        ("--data.init_args.batch_size=0", "SFTDataModule: batch_size=0 must be >= 1"),
    ],
)
def test_config_mistakes_print_one_line(
    capsys: pytest.CaptureFixture, override: str, expected: str
) -> None:
    assert main([*FIT, override]) == 2
    assert expected in one_error(capsys, "fit")


def test_a_mistake_inside_fit_is_one_line(capsys: pytest.CaptureFixture) -> None:
    """A MisconfigurationException raised once the Trainer runs (not while parsing)."""
    args = [*FIT, "--trainer.val_check_interval=0.5", "--trainer.enable_progress_bar=false"]
    assert main(args) == 2
    assert "val_check_interval" in one_error(capsys, "fit")


def test_debug_raises_the_typed_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="num_replicas=1 trains a single model"):
        main([*FIT, "--trainer.strategy.init_args.num_replicas=1", "--debug"])
    monkeypatch.setenv("SELMERGE_DEBUG", "1")  # jsonargparse wraps the constructor's error
    with pytest.raises(ValueError, match="nope.jsonl' does not exist"):
        main([*FIT, "--data.init_args.data_files=nope.jsonl"])
    with pytest.raises(ValueError, match="num_replicas=1 trains a single model"):
        DataOrderEnsemble(num_replicas=1)


def test_merge_and_report_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["merge", "a.safetensors", "b.safetensors", "--out", "merged"]) == 2
    assert "a.safetensors does not exist" in one_error(capsys, "merge")
    assert not (tmp_path / "merged").exists()
    assert main(["report", "runs/nothing"]) == 2
    assert "runs/nothing is not a directory" in one_error(capsys, "report")
    assert main(["report"]) == 2
    assert "logdir" in one_error(capsys, "report")


@pytest.mark.parametrize(
    ("argv", "error", "sentence"),
    [
        (["merge", "a.safetensors", "b.safetensors", "--out", "m"], MergeError, "does not exist"),
        (["merge", "r0.safetensors", "--out", "m"], MergeError, "needs at least 2 replicas"),
        (["merge", "--out", "m"], MergeError, "no replicas: give replica paths or --epoch_dir"),
        (["report", "runs/nothing"], ReportError, "runs/nothing is not a directory"),
    ],
)
def test_merge_and_report_take_the_hint_and_debug_like_fit(
    argv: list[str],
    error: type[Exception],
    sentence: str,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One line and the hint, exit 2; with --debug or SELMERGE_DEBUG=1 the typed exception."""
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and sentence in err[0], err
    assert err[0].startswith(f"lightning-selmerge {argv[0]}: error: ")
    assert err[1] == "(add --debug or set SELMERGE_DEBUG=1 to see the traceback)"
    with pytest.raises(error, match=sentence):
        main([*argv, "--debug"])
    monkeypatch.setenv("SELMERGE_DEBUG", "1")
    with pytest.raises(error, match=sentence):
        main(argv)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("args", "form"),
    [
        (["--method", "average", "--weights", "1", "3"], "--weights '[1,1,2]' (got --weights 1)"),
        (["--probabilities=0.5"], "--probabilities '[0.5,0.25,0.25]' (got --probabilities 0.5)"),
    ],
)
def test_a_list_option_given_bare_values_names_its_form(
    args: list[str], form: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["merge", "a.safetensors", "b.safetensors", "--out", "merged", *args]) == 2
    assert f"takes a list, one value per replica: {form}" in one_error(capsys, "merge")
    assert not (tmp_path / "merged").exists()


def test_the_real_command_exits_2_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightning_selmerge", *FIT, "--data.init_args.data_files=x.csv"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [
        "lightning-selmerge fit: error: SFTDataModule: data file 'x.csv' does not exist "
        f"(relative paths are read from {tmp_path}); fix data_files (command line: "
        "--data.init_args.data_files=PATH)."
    ]


def test_bugs_are_not_user_mistakes() -> None:
    assert not is_user_mistake(RuntimeError("boom"))
    assert not is_user_mistake(ZeroDivisionError())
    try:
        int("x")  # a ValueError raised outside this package's checks
    except ValueError as err:
        assert not is_user_mistake(err)
    try:
        DataOrderEnsemble(num_replicas=1)
    except ValueError as err:
        assert is_user_mistake(err)
    assert is_user_mistake(FileNotFoundError("data.jsonl"))


def test_the_innermost_message_of_nested_union_reports() -> None:
    nested = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'list'>, <class 'NoneType'>]
  Errors:
    - Does not validate against any of the Union subtypes
      Subtypes: [<class 'Callback'>, <class 'NoneType'>]
      Errors:
        - SelectionMergeCallback: every_n_epochs must be >= 1, got 0.
        - Expected a <class 'NoneType'>
      Given value type: <class 'Namespace'>
      Given value: Namespace(every_n_epochs=0)
    - Expected a <class 'NoneType'>
  Given value type: <class 'list'>
  Given value: [Namespace(every_n_epochs=0)]"""
    assert user_message(ValueError(nested)) == (
        "trainer.callbacks: SelectionMergeCallback: every_n_epochs must be >= 1, got 0."
    )


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("--trainer.callbacks.0.init_args.resample=3", "'0.init_args.resample' picks a list item"),
        ("--trainer.callbacks.init_args.resample=3", "(PositionLossMonitor), which takes no"),
    ],
)
def test_a_callback_option_the_last_callback_lacks_names_it_and_the_fix(
    option: str, says: str, capsys: pytest.CaptureFixture
) -> None:
    assert main([*FIT, option, "--print_config"]) == 2
    line = one_error(capsys, "fit")
    assert says in line and "NestedArg" not in line
    assert "a later --config that restates trainer.callbacks changes any item" in line


def test_a_layout_refused_on_cpus_auto_devices_names_the_devices_flag(
    capsys: pytest.CaptureFixture,
) -> None:
    """``devices: auto`` is 1 device on CPU: the refusal says so and names --trainer.devices."""
    args = [*FIT, "--trainer.accelerator=cpu", "--trainer.devices=auto"]
    assert main([*args, "--trainer.strategy.init_args.shard_size=2"]) == 2
    line = one_error(capsys, "fit")
    assert "1 rank is not divisible by shard_size=2" in line
    assert "on CPU, devices=auto is 1 device" in line
    assert "--trainer.devices=2" in line


def test_a_refused_argument_prints_nothing_before_its_error(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Lightning's "Seed set to 0" waits for the classes to be built: the error is alone."""
    assert main([*FIT, "--trainer.strategy.init_args.num_replicas=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("lightning-selmerge fit: error: DataOrderEnsemble: num_replicas=1")
    assert len(err) == 2, err
    assert not [r for r in caplog.records if "Seed set to" in r.getMessage()]


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (
            "--model=CausalLMModul",
            "model: no class named 'CausalLMModul' (did you mean CausalLMModule?)",
        ),
        (
            "--data.class_path=SFTDataModul",
            "data: no class named 'SFTDataModul' (did you mean SFTDataModule?)",
        ),
        ("--trainer.callbacks+=ModelCheckpont", "(did you mean ModelCheckpoint or Checkpoint?)"),
        (
            "--trainer.strategy.class_path=DataOrderEnsembel",
            "trainer.strategy: no class named 'DataOrderEnsembel' "
            "(did you mean DataOrderEnsemble?)",
        ),
    ],
)
def test_a_class_name_typo_names_the_class_meant(
    option: str, says: str, capsys: pytest.CaptureFixture
) -> None:
    assert main([*FIT, option]) == 2
    line = one_error(capsys, "fit")
    assert says in line and "or a full import path (package.module.Class)" in line
    assert "expected one of" not in line


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("DataOrderEnsemble", "give the class as --trainer.strategy.class_path=DataOrderEnsemble"),
        (
            "DataOrderEnsembel",
            "no strategy named 'DataOrderEnsembel' (did you mean DataOrderEnsemble?)",
        ),
        ("dp", "no strategy named 'dp' (did you mean ddp or fsdp?)"),
    ],
)
def test_a_class_or_unknown_name_as_trainer_strategy_is_one_line(
    name: str, says: str, capsys: pytest.CaptureFixture
) -> None:
    """``--trainer.strategy=NAME`` reaches the Trainer as a Lightning strategy name: a class name
    (or a typo) was Lightning's ValueError with a traceback, exit 1."""
    assert main([*FIT, f"--trainer.strategy={name}"]) == 2
    assert says in one_error(capsys, "fit")


def test_a_missing_ckpt_path_is_named_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    assert main([*FIT, "--ckpt_path=missing.ckpt"]) == 2
    line = one_error(capsys, "fit")
    assert (
        f"checkpoint 'missing.ckpt' does not exist (relative paths are read from {tmp_path})"
        in line
    )
    assert not [r for r in caplog.records if "GPU available" in r.getMessage()]
