"""The README's commands and snippets run as written (placeholders filled with local files)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import shlex
import warnings
from pathlib import Path

import pytest
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_selmerge.cli import main
from lightning_selmerge.hf import CausalLMModule, SequenceClassificationModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def fit_commands() -> list[list[str]]:
    """Every ``lightning-selmerge fit`` command of the README's bash blocks, as argv."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("lightning-selmerge fit"):
                commands.append(shlex.split(line)[2:])  # after "lightning-selmerge fit"
    return commands


def minilm() -> str:
    """The README's MINILM=$(python -c ...) line, evaluated."""
    (line,) = [
        line for line in "\n".join(blocks("bash")).splitlines() if line.startswith("MINILM=")
    ]
    code = re.fullmatch(r'MINILM=\$\(python -c "(.*)"\)', line)[1]
    printed: list[str] = []
    exec(code, {"print": lambda value: printed.append(str(value))})
    return printed[0]


def fill(arg: str, placeholders: dict[str, str]) -> str:
    for placeholder, value in placeholders.items():
        arg = arg.replace(placeholder, value)
    return arg


def callbacks_yaml() -> str:
    """The README's ``my_callbacks.yaml``, the layered config that restates the callbacks."""
    (block,) = [b for b in blocks("yaml") if b.startswith("# my_callbacks.yaml")]
    return block


@pytest.fixture
def placeholders(tmp_path: Path) -> dict[str, str]:
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=300)
    config.bos_token_id = config.eos_token_id = 1
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "local_model")
    (tmp_path / "my_callbacks.yaml").write_text(callbacks_yaml())
    return {
        "/path/to/local/model": str(tmp_path / "local_model"),
        "/path/to/train.jsonl": str(ROOT / "examples/data/chatterbot_pairs.jsonl"),
        "$MINILM": minilm(),
        "my_callbacks.yaml": str(tmp_path / "my_callbacks.yaml"),
    }


def test_every_config_has_a_ready_command() -> None:
    named = {arg for command in fit_commands() for arg in command if arg.startswith("configs/")}
    assert named == {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    switched = [c for c in fit_commands() if "--model.init_args.model_name_or_path" in " ".join(c)]
    assert switched and all("--model.init_args.config=null" in c for c in switched)


@pytest.mark.parametrize("index", range(len(fit_commands())))
def test_readme_fit_command_parses(
    index: int, placeholders: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(ROOT)  # the commands use repository-relative config paths
    argv = [fill(arg, placeholders) for arg in fit_commands()[index]]
    if "--print_config" not in argv:
        argv.append("--print_config")
    with pytest.raises(SystemExit) as done:
        main(["fit", *argv])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"]["class_path"].endswith("DataOrderEnsemble")


def test_minilm_directory_loads_as_the_classification_config_asks() -> None:
    """The README's MINILM directory is a checkpoint the classification module fine-tunes."""
    config = yaml.safe_load((ROOT / "configs/classification.yaml").read_text())
    module = SequenceClassificationModule(
        model_name_or_path=minilm(), num_labels=config["model"]["init_args"]["num_labels"]
    )
    assert module.model.config.model_type == "bert"
    assert module.model.training  # fine-tuned with dropout on


def test_generation_snippet_runs_on_a_saved_model(tmp_path: Path) -> None:
    (snippet,) = [b for b in blocks("python") if "model.generate(" in b]
    module = CausalLMModule(
        config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}
    )
    module.save_pretrained(tmp_path / "merged")
    path_line = re.search(r'^path = ".*"', snippet, re.MULTILINE)[0]
    code = snippet.replace(path_line, f"path = {str(tmp_path / 'merged')!r}")
    printed: list[str] = []
    exec(code, {"print": lambda value: printed.append(value)})
    assert len(printed) == 1 and isinstance(printed[0], str)


def printed_callbacks(argv: list[str], capsys: pytest.CaptureFixture) -> list[tuple[str, dict]]:
    """(class name, init_args) of each callback ``fit ARGV --print_config`` prints."""
    with pytest.raises(SystemExit) as done:
        main(["fit", *argv, "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    return [(c["class_path"].rsplit(".", 1)[-1], c["init_args"]) for c in printed]


def test_callbacks_are_changed_as_the_readme_says(
    placeholders: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Only the last callback is reachable by flags; a layered config replaces the list."""
    monkeypatch.chdir(ROOT)
    demo = ["--config", "configs/demo.yaml"]
    (merge, monitor) = printed_callbacks(
        [*demo, "--trainer.callbacks.init_args.probe_size=7"], capsys
    )
    assert merge[1]["resample"] == 1 and monitor[0] == "PositionLossMonitor"
    assert monitor[1]["probe_size"] == 7
    for refused in (
        "--trainer.callbacks.init_args.resample=3",
        "--trainer.callbacks.0.init_args.resample=3",
    ):
        assert main(["fit", *demo, refused, "--print_config"]) == 2
    layered = [*demo, "--config", placeholders["my_callbacks.yaml"]]
    expected = yaml.safe_load(callbacks_yaml())["trainer"]["callbacks"]
    callbacks = printed_callbacks(layered, capsys)
    assert [name for name, _ in callbacks] == [c["class_path"] for c in expected]
    for (_, args), given in zip(callbacks, expected):
        assert args.items() >= given["init_args"].items()
    # an item of the same class at the same position of a list of the same length keeps the
    # earlier item's settings; in a list of another length it starts from the defaults
    expected[0]["init_args"].pop("save_dir")
    for kept in (expected, expected[:1]):
        trimmed = tmp_path / "trimmed.yaml"
        trimmed.write_text(yaml.safe_dump({"trainer": {"callbacks": kept}}))
        callbacks = printed_callbacks([*demo, "--config", str(trimmed)], capsys)
        assert [name for name, _ in callbacks] == [c["class_path"] for c in kept]
        assert callbacks[0][1]["resample"] == 3
        assert callbacks[0][1]["save_dir"] == ("runs/demo/merged" if len(kept) == 2 else None)
    appended = [*demo, "--trainer.callbacks+=ModelCheckpoint"]
    appended += ["--trainer.callbacks.init_args.save_last=true"]
    names = printed_callbacks(appended, capsys)
    assert [n for n, _ in names] == [
        "SelectionMergeCallback",
        "PositionLossMonitor",
        "ModelCheckpoint",
    ]
    assert names[2][1]["save_last"] is True and names[0][1]["save_dir"] == "runs/demo/merged"
