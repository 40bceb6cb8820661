"""Save a Hugging Face model together with its tokenizer, as one directory written atomically.

``model.save_pretrained(dir)`` alone leaves a directory that ``AutoTokenizer.from_pretrained``
silently misreads (it falls back to the config's tokenizer class with no vocabulary: GPT-2's
tokenizer of length 1 for a GPT-2 config). :func:`save_pretrained` writes both, so the directory
loads with ``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_selmerge.merging.checkpoints import publish_directory

__all__ = ["save_pretrained"]


def save_pretrained(
    model: Any,
    tokenizer: Any,
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (optionally with the weights ``state_dict``) and ``tokenizer`` to
    ``directory`` with ``save_pretrained`` (safetensors).

    The files are written under a temporary name beside ``directory`` and renamed into place
    when complete; an existing ``directory`` is replaced (``overwrite=True``, like
    ``save_pretrained``) or refused with ``FileExistsError``. Returns the directory.

    Example:
        >>> import tempfile
        >>> from transformers import AutoTokenizer
        >>> from lightning_selmerge.hf import CausalLMModule
        >>> module = CausalLMModule(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16,
        ...                                 "n_head": 2, "n_positions": 32})
        >>> out = module.save_pretrained(tempfile.mkdtemp() + "/model")
        >>> len(AutoTokenizer.from_pretrained(out)) == len(module.tokenizer)
        True
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists: choose another directory or pass overwrite=True."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        kwargs = {} if state_dict is None else {"state_dict": dict(state_dict)}
        model.save_pretrained(staging, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        publish_directory(staging, target, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
