"""Export of a merge as a Hugging Face directory (``SelectionMergeCallback(save_dir=...)``):
the outermost pretrained model inside the LightningModule, written under a temporary name and
renamed into place, the tokenizer beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_selmerge.merging.leftovers import recover_output

__all__ = ["export_merge", "pretrained_submodule", "warn_later_exports"]


def export_merge(pl_module: LightningModule, merged: dict[str, torch.Tensor], target: Path) -> None:
    """Write the merged model as a Hugging Face directory (temporary name, then rename;
    the old export stays until then)."""
    prefix, model = pretrained_submodule(pl_module)
    state = {
        name[len(prefix) :]: tensor for name, tensor in merged.items() if name.startswith(prefix)
    }
    recover_output(target)  # what a killed export left behind
    # the staged write of hf.export (imported here: hf's modules import the ensemble)
    from lightning_selmerge.hf.export import save_pretrained

    save_pretrained(model, getattr(pl_module, "tokenizer", None), target, state)


def warn_later_exports(save_dir: Path, last_epoch: int) -> None:
    """Warn of ``save_dir``'s exports past ``last_epoch``: an earlier, longer run's."""
    later = sorted(
        path.name
        for path in save_dir.glob("epoch_*")
        if path.is_dir() and path.name[6:].isdigit() and int(path.name[6:]) > last_epoch
    )
    if later:
        rank_zero_warn(
            f"SelectionMergeCallback: {save_dir} also holds {', '.join(later)}, merged models "
            f"of an earlier, longer run (this fit saved up to epoch_{last_epoch:03d}); give each "
            "run its own save_dir, or delete them."
        )


def pretrained_submodule(pl_module: LightningModule) -> tuple[str, Any]:
    """(state-dict prefix, module) of the outermost Hugging Face model inside ``pl_module``."""
    for name, module in pl_module.named_modules():
        if callable(getattr(module, "save_pretrained", None)) and hasattr(module, "config"):
            return (f"{name}." if name else ""), module
    raise MisconfigurationException(
        f"SelectionMergeCallback(save_dir=...) exports the merge with save_pretrained, but "
        f"{type(pl_module).__name__} holds no Hugging Face PreTrainedModel; keep the model as "
        "an attribute (e.g. self.model = AutoModelForCausalLM.from_config(...)) or drop "
        "save_dir and use the checkpoint's state_dict (the merged model)."
    )
