"""LoRA adapters on a Hugging Face module's model, from a plain settings mapping (a YAML block).

``peft`` is optional (``pip install 'lightning_selmerge[peft]'``): it is imported only when
adapters are asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["with_lora"]


def with_lora(owner: str, model: Any, settings: Mapping[str, Any], task_type: str) -> Any:
    """``model`` wrapped by ``peft.get_peft_model`` with ``peft.LoraConfig(**settings)``.

    ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``) is the default of ``settings["task_type"]``;
    with ``"SEQ_CLS"`` peft trains the classification head fully beside the adapters. Without
    ``target_modules``, peft's default for the model type applies (GPT-2: ``c_attn``; Llama:
    ``q_proj``, ``v_proj``). Only the adapters (and such heads) train: the base is frozen,
    which :class:`~lightning_selmerge.ensemble.DataOrderEnsemble` holds once for all replicas.

    Raises:
        ImportError: peft is not installed.
        ValueError: a setting ``LoraConfig`` does not take, or target modules the model lacks.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
        >>> model = with_lora("CausalLMModule", base, {"r": 2}, "CAUSAL_LM")
        >>> sorted({n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad})
        ['lora_A', 'lora_B']
    """
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"{owner}: lora={dict(settings)} needs peft: pip install 'lightning_selmerge[peft]'"
        ) from err
    options = {"task_type": task_type, **settings}
    try:
        config = peft.LoraConfig(**options)
    except TypeError as err:  # an unknown keyword
        raise ValueError(
            f"{owner}: lora={dict(settings)}: {err}; its keys are peft.LoraConfig's arguments "
            "(r, lora_alpha, lora_dropout, target_modules, modules_to_save, ...)."
        ) from err
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # target modules not found, none known for the model type
        raise ValueError(
            f"{owner}: lora={dict(settings)}: {err}; set target_modules to names of the "
            f"model's linear layers (e.g. {_linear_names(model)})."
        ) from err


def _linear_names(model: Any, limit: int = 6) -> list[str]:
    """The distinct last names of ``model``'s linear-like layers, a few of them."""
    import torch

    names: list[str] = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if linear and last not in names:
            names.append(last)
    return names[:limit]
