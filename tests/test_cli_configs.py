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


@pytest.mark.parametrize(
    ("option", "key", "value"),
    [
        ("--model.init_args.config.n_positions=64", "config", {"n_positions": 64, "n_layer": 2}),
        ("--model.init_args.config.attn_pdrop=0.0", "config", {"attn_pdrop": 0.0}),
        (
            "--model.init_args.config.scale_attn_weights=false",
            "config",
            {"scale_attn_weights": False},
        ),
        (
            "--model.init_args.config={model_type: gpt2, n_layer: 1}",
            "config",
            {"model_type": "gpt2", "n_layer": 1},
        ),
        ("--model.init_args.lora.r=8", "lora", {"r": 8}),
        ("--model.init_args.lora.target_modules=[c_attn]", "lora", {"target_modules": ["c_attn"]}),
    ],
)
def test_a_dict_arguments_field_from_the_command_line_keeps_its_yaml_type(
    option: str, key: str, value: dict, capsys: pytest.CaptureFixture
) -> None:
    """``--model.init_args.config.n_positions=64`` is the int 64, as in YAML, not the string."""
    demo = CONFIGS / "demo.yaml"
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(demo), option, "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"][key]
    assert {k: printed[k] for k in value} == value
