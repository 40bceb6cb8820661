"""``gradient_checkpointing=True`` on the Hugging Face modules: the same loss and gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_hf_modules import TINY

from lightning_selmerge.hf import CausalLMModule, SequenceClassificationModule


def gradients(module_class: type, labels: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = module_class(config=TINY, **kwargs)
    module.train()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]), "labels": labels}
    torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG state
    module.per_sample_loss(batch).sum().backward()
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [None, {"r": 2}])
@pytest.mark.parametrize("module_class", [CausalLMModule, SequenceClassificationModule])
def test_checkpointing_gives_the_same_gradients(module_class: type, lora: Any) -> None:
    labels = (
        torch.tensor([[5, 6, 7, 8, 9], [-100, -100, 7, 6, 5]])
        if module_class is CausalLMModule
        else torch.tensor([0, 1])
    )
    plain = gradients(module_class, labels, lora=lora)
    checkpointed = gradients(module_class, labels, lora=lora, gradient_checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


def test_the_module_checkpoints_its_blocks() -> None:
    module = CausalLMModule(config=TINY, gradient_checkpointing=True)
    model = module.model
    assert getattr(model, "is_activation_checkpointing", model.is_gradient_checkpointing)
