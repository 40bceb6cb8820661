"""Every shipped config runs through ``lightning-selmerge fit`` (offline, a batch per replica)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from lightning_selmerge.cli import main

warnings.filterwarnings("ignore", ".*does not have many workers.*")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
QUICK = ["--trainer.fast_dev_run=1", "--trainer.logger=false", "--trainer.accelerator=cpu"]


def data_args(config: Path) -> list[str]:
    """Absolute data paths: the tests run in a temporary working directory."""
    init = yaml.safe_load(config.read_text())["data"]["init_args"]
    return [f"--data.init_args.data_files={ROOT / init['data_files']}"]


@pytest.mark.parametrize("name", ["demo", "sft_causal_lm", "classification"])
def test_config_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / f"{name}.yaml"
    assert main(["fit", "--config", str(config), *data_args(config), *QUICK]) == 0


def test_sft_config_on_a_local_checkpoint_as_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command in the config's header and the README: a checkpoint replaces the config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=300)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "local_model")
    monkeypatch.chdir(tmp_path)
    sft = CONFIGS / "sft_causal_lm.yaml"
    header = sft.read_text().split("seed_everything")[0]
    assert "--model.init_args.config=null" in header
    args = ["fit", "--config", str(sft), "--model.init_args.config=null"]
    args += [f"--model.init_args.model_name_or_path={tmp_path / 'local_model'}"]
    assert main([*args, *data_args(sft), *QUICK]) == 0


def test_fixed_batches_layers_on_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    demo = CONFIGS / "demo.yaml"
    args = ["fit", "--config", str(demo), "--config", str(CONFIGS / "fixed_batches.yaml")]
    args += [*data_args(demo), *QUICK, "--print_config"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0


def test_print_config_round_trips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    demo = CONFIGS / "demo.yaml"
    fixed = CONFIGS / "fixed_batches.yaml"
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(demo),
                "--config",
                str(fixed),
                *data_args(demo),
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"].endswith("DataOrderEnsemble")
    assert strategy["init_args"]["num_replicas"] == 4
    assert strategy["init_args"]["fixed_batches"] is True
    callbacks = {
        c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in config["trainer"]["callbacks"]
    }
    assert callbacks["SelectionMergeCallback"]["resample"] == 1
    assert "validate_replicas" in callbacks["SelectionMergeCallback"]  # every option is shown
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config
    # and the printed config trains, exporting a merged model that loads with from_pretrained
    assert main(["fit", "--config", str(saved), *QUICK]) == 0
    (exported,) = (tmp_path / "runs" / "demo" / "merged").iterdir()
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.n_layer == 2


def test_python_dash_m_runs_the_command() -> None:
    """``python -m lightning_selmerge`` is what ``scripts/dev.py demo`` calls."""
    done = subprocess.run(
        [sys.executable, "-m", "lightning_selmerge", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0
    assert "fit, validate, test, predict" in done.stdout  # pipes into grep or less
    assert done.stderr == ""
