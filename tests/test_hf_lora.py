"""The Hugging Face modules' ``lora`` option: adapters on a frozen base, merged and exported."""

from __future__ import annotations

import logging
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_hf_modules import PAIRS, TINY, trainer

from lightning_selmerge.cli import main
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.hf import CausalLMModule, SequenceClassificationModule, SFTDataModule

ROOT = Path(__file__).resolve().parents[1]


def lora_module() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(config=TINY, learning_rate=1e-2, lora={"r": 2, "lora_alpha": 4})


def test_an_ensemble_of_lora_adapters_trains_merges_and_exports_them(tmp_path: Path) -> None:
    module = lora_module()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    dm = SFTDataModule(data_files=str(PAIRS), limit_samples=16, batch_size=4, max_length=96)
    fit = trainer(
        tmp_path,
        max_epochs=1,
        strategy=DataOrderEnsemble(num_replicas=2, seed=0),
        callbacks=[SelectionMergeCallback(seed=0, save_dir=str(tmp_path / "merged"))],
    )
    fit.fit(module, dm)
    after = dict(module.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in frozen.items())  # the base
    assert any(not torch.equal(after[n], lora_module().get_parameter(n)) for n in trained)

    # the export is the merged adapters: a fresh module loading them computes the same logits
    exported = tmp_path / "merged" / "epoch_000"
    assert (exported / "adapter_config.json").is_file()
    fresh = lora_module()
    peft.set_peft_model_state_dict(fresh.model, load_file(exported / "adapter_model.safetensors"))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    module.eval(), fresh.eval()
    assert torch.equal(module(batch).logits, fresh(batch).logits)


def test_a_classifier_trains_its_head_beside_the_adapters() -> None:
    module = SequenceClassificationModule(config=TINY, num_labels=3, lora={"r": 2})
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any("score" in n and "modules_to_save" in n for n in trained)  # GPT-2's head
    assert any(".lora_A." in n for n in trained)


def test_bad_lora_settings_are_named_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"lora=\{'rank': 2\}.*LoraConfig's arguments"):
        CausalLMModule(config=TINY, lora={"rank": 2})
    with pytest.raises(ValueError, match=r"set target_modules to .*'c_attn'"):
        CausalLMModule(config=TINY, lora={"r": 2, "target_modules": ["q_proj"]})


def test_the_command_line_takes_lora_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "demo.yaml")]
    args += ['--model.init_args.lora={"r": 2, "target_modules": ["c_attn", "c_fc"]}']
    args += [f"--data.init_args.data_files={PAIRS}", "--data.init_args.limit_samples=16"]
    args += ["--trainer.fast_dev_run=1", "--trainer.logger=false"]
    assert main(args) == 0
    # the demo's merge callback exported the merged adapters
    assert (tmp_path / "runs" / "demo" / "merged" / "epoch_000" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["selection", "average"])
def test_selection_of_adapters_is_named_at_fit_start(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)  # lightning's logger does not propagate to the root
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            fit = trainer(
                tmp_path,
                max_steps=0,
                strategy=DataOrderEnsemble(num_replicas=2, seed=0),
                callbacks=[SelectionMergeCallback(method=method)],
            )
            dm = SFTDataModule(data_files=str(PAIRS), limit_samples=8, batch_size=4)
            fit.fit(lora_module(), dm)
    finally:
        logger.removeHandler(caplog.handler)
    named = "selection draws the LoRA matrices' elements" in caplog.text
    assert named == (method == "selection")
