"""A CausalLMModule ensemble fit on gloo ranks, then ``module.save_pretrained`` on every rank.

``python tests/hf_save_worker.py OUT DEVICES SHARD_SIZE``: K = 2 replicas of a tiny GPT-2 (tied
embeddings) for one epoch; every rank calls ``module.save_pretrained(OUT/saved)`` as a script
run on several ranks does; rank 0 writes ``OUT/merged.pt`` (the whole merge). Run by
tests/test_hf_export.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lightning_selmerge import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.hf import CausalLMModule, SFTDataModule

ROOT = Path(__file__).parent.parent


def main() -> None:
    out, devices, shard = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}
    module = CausalLMModule(config=gpt2, learning_rate=1e-3)
    data = SFTDataModule(
        data_files=str(ROOT / "examples" / "data" / "chatterbot_pairs.jsonl"),
        max_length=32,
        batch_size=4,
        limit_samples=20,
        val_fraction=0.2,
    )
    merge = SelectionMergeCallback(resample=1, seed=5)
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=2, seed=1, shard_size=shard),
        accelerator="cpu",
        devices=devices,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[merge],
    )
    trainer.fit(module, datamodule=data)
    merged = trainer.strategy.full_state(merge.merged_state, rank=0)
    module.save_pretrained(out / "saved")
    if trainer.is_global_zero:
        torch.save(merged, out / "merged.pt")


if __name__ == "__main__":
    main()
