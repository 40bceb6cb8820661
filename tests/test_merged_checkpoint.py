"""``ModelCheckpoint(save_weights_only=True)``: a checkpoint of the merged model only."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from ensemble_support import Net, fit
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_selmerge.ensemble import CHECKPOINT_KEY, SelectionMergeCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")

K = 3  # 8 batches per replica: 24 steps per epoch


def test_weights_only_checkpoints_hold_the_merge_only(tmp_path: Path) -> None:
    merges: dict[int, dict[str, torch.Tensor]] = {}

    class RecordMerges(SelectionMergeCallback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            super().on_train_epoch_end(trainer, pl_module)
            merges[trainer.global_step] = {k: v.clone() for k, v in self.merged_state.items()}

    small = ModelCheckpoint(tmp_path / "merged", save_weights_only=True, save_top_k=-1)
    full = ModelCheckpoint(tmp_path / "full", save_top_k=-1, every_n_train_steps=24)  # = epochs
    module = Net()
    fit(
        module,
        K,
        epochs=2,
        callbacks=[RecordMerges(seed=1), small, full],
        enable_checkpointing=True,
    )

    for step, merged in merges.items():
        (path,) = (tmp_path / "merged").glob(f"*-step={step}.ckpt")
        checkpoint = torch.load(path, weights_only=False)
        assert CHECKPOINT_KEY not in checkpoint and "optimizer_states" not in checkpoint
        assert checkpoint["state_dict"].keys() == merged.keys()
        for name, tensor in merged.items():  # the epoch's merge, not the live replica
            assert torch.equal(checkpoint["state_dict"][name], tensor), name
        loaded = Net.load_from_checkpoint(path)
        for name, tensor in merged.items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        (whole,) = (tmp_path / "full").glob(f"*-step={step}.ckpt")
        for name, tensor in merged.items():  # the full checkpoint's state_dict is the same
            assert torch.equal(torch.load(whole, weights_only=False)["state_dict"][name], tensor)
    final = module.state_dict()
    last = torch.load(max((tmp_path / "merged").glob("*.ckpt")), weights_only=False)
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final.items())
