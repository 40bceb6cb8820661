"""What ``--help`` says matches what the commands do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from safetensors.torch import save_file

from lightning_selmerge.cli import main
from lightning_selmerge.cli.merge import merge_parser
from lightning_selmerge.merging import MergeError
from lightning_selmerge.merging.checkpoints import PROVENANCE_NAME
from lightning_selmerge.merging.methods import build_method, method_class, method_names


def option_help(parser: ArgumentParser, option: str) -> str:
    """The help text ``--help`` shows for ``option`` (before jsonargparse's type and default)."""
    (action,) = [a for a in parser._actions if option in a.option_strings]
    return str(action.help)


ROOT = Path(__file__).resolve().parent.parent
MERGE = merge_parser()


def takers(name: str) -> list[str]:
    return [m for m in method_names() if name in {p.name for p in method_class(m).parameters()}]


METHOD_OPTIONS = sorted({p.name for m in method_names() for p in method_class(m).parameters()})


@pytest.mark.parametrize("name", METHOD_OPTIONS)
def test_each_method_option_shows_every_takers_own_help(name: str) -> None:
    shown = option_help(MERGE, f"--{name}")
    for method in takers(name):
        (parameter,) = [p for p in method_class(method).parameters() if p.name == name]
        group = re.search(rf"(?:^|; )([a-z_, ]*\b{method}\b[a-z_, ]*): ", shown)
        assert group, (method, shown)
        own = parameter.help.removeprefix(f"{group[1]}: ")
        assert f"{group[1]}: {own}" in shown, (method, shown)


def test_weights_help_says_which_methods_take_negative_weights() -> None:
    shown = option_help(MERGE, "--weights")
    assert "average, dare, ties: one non-negative weight per replica" in shown
    assert "task_arithmetic: one weight per replica" in shown
    assert "negative ones with combine sum only" in shown
    # as the help says: task_arithmetic (combine sum) takes them, the others refuse them
    build_method("task_arithmetic", {"weights": [1.0, -0.5]}).validate(2)
    for method, params in [
        ("average", {}),
        ("dare", {}),
        ("ties", {}),
        ("task_arithmetic", {"combine": "selection"}),
    ]:
        with pytest.raises(MergeError, match="negative|>= 0"):
            build_method(method, {**params, "weights": [1.0, -0.5]}).validate(2)


def test_combine_help_names_each_methods_choices_and_default() -> None:
    shown = option_help(MERGE, "--combine")
    assert "dare, ties: mean|selection (default: mean)" in shown
    assert "task_arithmetic: sum|selection (default: sum)" in shown
    assert build_method("task_arithmetic", {}).combine == "sum"
    assert build_method("ties", {}).combine == build_method("dare", {}).combine == "mean"


def test_replica_paths_are_required_unless_epoch_dir() -> None:
    (replicas,) = [a for a in MERGE._actions if a.dest == "replicas"]
    assert not replicas.required and "required unless --epoch_dir" in str(replicas.help)
    positional = MERGE.format_help().split("positional arguments:")[1].split("options:")[0]
    assert "(required)" not in positional


@pytest.mark.parametrize(
    ("flags", "streams"),
    [([], False), (["--draw_prefix", "model."], True), (["--streaming", "true"], True)],
)
def test_streaming_default_is_as_the_help_says(
    flags: list[str], streams: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shown = option_help(MERGE, "--streaming")
    assert "default: streaming for --epoch_dir and for replica paths with --draw_prefix" in shown
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file({"w": torch.full((4,), float(k))}, paths[-1])
    out = tmp_path / "merged"
    assert main(["merge", *map(str, paths), "--out", str(out), "--quiet", *flags]) == 0
    assert json.loads((out / PROVENANCE_NAME).read_text())["streaming"] is streams


REPLICA_FLAGS = ("--replica", "--num_replicas", "--snapshot_dir")


def lightning_help(command: str, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_replica_flags_are_listed_for_fit_only(command: str, capsys: pytest.CaptureFixture) -> None:
    shown = lightning_help(command, capsys)
    for flag in REPLICA_FLAGS:
        assert (f"{flag} " in shown) is (command == "fit"), (command, flag)


def test_validate_takes_a_config_fit_saved_and_refuses_replica_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/demo.yaml", "--print_config"])
    saved = tmp_path / "config.yaml"  # what a fit saves beside its logs
    saved.write_text(capsys.readouterr().out)
    assert "replica: null" in saved.read_text()
    with pytest.raises(SystemExit) as done:
        main(["validate", "--config", str(saved), "--print_config"])
    assert done.value.code == 0
    capsys.readouterr()
    assert main(["validate", "--config", str(saved), "--replica", "0"]) == 2
    assert "validate: error: --replica is for 'fit'" in capsys.readouterr().err


def test_top_level_help_goes_to_stdout_and_a_missing_command_to_stderr(
    capsys: pytest.CaptureFixture,
) -> None:
    """``lightning-selmerge --help | less`` shows the usage; a bare call is an error."""
    assert main(["--help"]) == 0
    shown = capsys.readouterr()
    assert "fit, validate, test, predict" in shown.out and shown.err == ""
    assert main([]) == 2
    shown = capsys.readouterr()
    assert "fit, validate, test, predict" in shown.err and shown.out == ""


def test_fit_help_names_the_command(capsys: pytest.CaptureFixture) -> None:
    """Under ``python -m lightning_selmerge`` the usage read ``__main__.py [options] fit``."""
    assert lightning_help("fit", capsys).startswith("usage: lightning-selmerge [options] fit ")
