"""A model saved with its tokenizer loads back whole, and generation sees what training saw."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lightning_selmerge.hf import CausalLMModule, SFTDataModule, save_pretrained
from lightning_selmerge.hf.loading import byte_tokenizer
from lightning_selmerge.hf.preprocess import IGNORE_INDEX

hf_logging.set_verbosity_error()

PAIRS = Path(__file__).resolve().parents[1] / "examples" / "data" / "chatterbot_pairs.jsonl"
TINY = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 128}
TEXT = "Hé, wörld!\n  日本 </s> x"


def test_module_save_pretrained_writes_a_tokenizer_that_loads_back(tmp_path: Path) -> None:
    module = CausalLMModule(config=TINY)
    out = module.save_pretrained(tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging left behind
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(module.tokenizer) == 259
    assert tokenizer(TEXT)["input_ids"] == module.tokenizer(TEXT)["input_ids"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # saving again replaces the directory; refusing leaves it alone
    module.save_pretrained(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(module.model, module.tokenizer, out, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_byte_tokenizer_adds_no_special_token_and_keeps_byt5_ids() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer("hi é")["input_ids"]
    assert ids == [b + 3 for b in "hi é".encode()]
    assert tokenizer.decode(ids) == "hi é"
    assert tokenizer("a</s>")["input_ids"][-1] == tokenizer.eos_token_id  # written EOS is EOS


def test_generation_input_is_the_training_prompt_without_eos() -> None:
    """The prompt of a training example and the tokenised prompt given to generate() agree."""
    tokenizer = byte_tokenizer()
    data = SFTDataModule(data_files=str(PAIRS), limit_samples=8, max_length=256)
    data.tokenizer = tokenizer
    data.setup("fit")
    raw = data.train_set
    for row in raw:
        ids, labels = row["input_ids"], row["labels"]
        prompt_len = sum(1 for label in labels if label == IGNORE_INDEX)
        prompt_text = tokenizer.decode(ids[:prompt_len])
        generation_input = tokenizer(prompt_text)["input_ids"]
        assert generation_input == ids[:prompt_len]
        assert generation_input[-1] != tokenizer.eos_token_id
        assert ids[-1] == tokenizer.eos_token_id  # EOS ends the response only


@pytest.mark.parametrize("bars_on", [True, False])
def test_saving_prints_no_shard_progress_bar_and_keeps_the_users_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bars_on: bool
) -> None:
    (hf_logging.enable_progress_bar if bars_on else hf_logging.disable_progress_bar)()
    try:
        CausalLMModule(config=TINY).save_pretrained(tmp_path / "m")
        assert "Writing model shards" not in capsys.readouterr().err
        assert hf_logging.is_progress_bar_enabled() is bars_on
    finally:
        hf_logging.enable_progress_bar()


def test_an_export_is_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    """On a shared cluster directory the merge may run as another user: the exported directory
    gets the umask's permissions, not a private temporary directory's (0700)."""
    import stat

    from lightning_selmerge.ensemble.replica_snapshots import write_snapshot

    module = CausalLMModule(config=TINY)
    previous = os.umask(0o022)
    try:
        out = module.save_pretrained(tmp_path / "merged")
        state = {f"model.{n}": t for n, t in module.model.state_dict().items()}
        snapshot = write_snapshot(
            tmp_path / "replica_000", state, {"replica": 0}, module.model, module.tokenizer
        )
    finally:
        os.umask(previous)
    for directory in (out, snapshot):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory


@pytest.mark.parametrize("shard_size", [1, 2])
def test_module_save_pretrained_after_a_fit_on_two_ranks(tmp_path: Path, shard_size: int) -> None:
    """Every rank calls ``module.save_pretrained(dir)`` after the fit, as a script does: one
    complete directory holding the merge (transformers writes the weights on rank 0 only, so
    another rank's staged copy held only the tokenizer and could replace it; a sharded model's
    DTensors made it raise)."""
    import subprocess
    import sys

    from ensemble_support import child_env

    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, str(tests / "hf_save_worker.py"), str(tmp_path), "2", str(shard_size)],
        env=child_env(tests.parent, tests),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    saved = tmp_path / "saved"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in saved.iterdir()
    }
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".saved")]
    model = AutoModelForCausalLM.from_pretrained(saved)
    merged = torch.load(tmp_path / "merged.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, merged[f"model.{name}"]), name
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert len(AutoTokenizer.from_pretrained(saved)) == 259
