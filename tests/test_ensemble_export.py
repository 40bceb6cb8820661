"""Per-epoch Hugging Face export of the merged model (a tiny GPT-2 built from a config)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class TinyLM(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _export_fit(module: TinyLM, save_dir: Path, epochs: int) -> None:
    merge = SelectionMergeCallback(seed=4, save_dir=str(save_dir))
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=2, seed=0),
        callbacks=[merge],
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    ids = torch.randint(0, 32, (24, 12), generator=torch.Generator().manual_seed(1))
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=6))


def test_merged_model_is_saved_each_epoch_with_save_pretrained(tmp_path: Path) -> None:
    module = TinyLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _export_fit(module, tmp_path / "merged", epochs=2)
    assert not [w for w in caught if "earlier, longer run" in str(w.message)]  # nothing earlier

    exported = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert exported == ["epoch_000", "epoch_001"]  # no temporary directories left behind
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged" / "epoch_001")
    final = module.model.state_dict()  # the module ends holding the last merge
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, final[name]), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    first = GPT2LMHeadModel.from_pretrained(tmp_path / "merged" / "epoch_000")
    assert not torch.equal(
        first.transformer.h[0].mlp.c_fc.weight, final["transformer.h.0.mlp.c_fc.weight"]
    )


def test_a_shorter_rerun_names_the_later_epochs_an_earlier_run_left(tmp_path: Path) -> None:
    _export_fit(TinyLM(), tmp_path / "merged", epochs=3)
    with pytest.warns(UserWarning, match=r"also holds epoch_002, merged models of an earlier"):
        _export_fit(TinyLM(), tmp_path / "merged", epochs=2)
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "epoch_000",
        "epoch_001",
        "epoch_002",
    ]
