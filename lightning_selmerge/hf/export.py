"""Save a Hugging Face model together with its tokenizer, as one directory written atomically.

``model.save_pretrained(dir)`` alone leaves a directory that ``AutoTokenizer.from_pretrained``
silently misreads (it falls back to the config's tokenizer class with no vocabulary: GPT-2's
tokenizer of length 1 for a GPT-2 config). :func:`save_pretrained` writes both, so the directory
loads with ``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lightning_selmerge.merging.checkpoints import publish_directory
from lightning_selmerge.merging.leftovers import staging_path

__all__ = ["save_pretrained", "write_pretrained_files"]


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

    On several ranks (``torch.distributed`` initialized) call it on every rank: global rank 0
    alone writes (transformers writes the weights on rank 0 only, so another rank's copy would
    hold just the tokenizer), and a model sharded with FSDP2 (``DataOrderEnsemble(shard_size >
    1)``) is first gathered whole, a collective over its shard ranks.

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
    if state_dict is None:
        state_dict = _gathered_state(model)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return target
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists: choose another directory or pass overwrite=True."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)  # made with the umask's permissions (mkdtemp: owner only)
    staging.mkdir()
    try:
        write_pretrained_files(model, tokenizer, staging, state_dict)
        publish_directory(staging, target, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _gathered_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The whole tensors of an FSDP2-sharded ``model`` (a collective; kept on global rank 0,
    ties kept), or ``None`` for a model holding no DTensor."""
    template = model.state_dict()
    if not any(isinstance(tensor, DTensor) for tensor in template.values()):
        return None
    from lightning_selmerge.ensemble.device_groups import full_state
    from lightning_selmerge.ensemble.replica_store import local_tensor

    local = {name: local_tensor(tensor) for name, tensor in template.items()}
    return full_state(template, local, keep=dist.get_rank() == 0)


def write_pretrained_files(
    model: Any,
    tokenizer: Any,
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """``model.save_pretrained`` (safetensors, with ``state_dict`` if given) and, when there is
    one, ``tokenizer.save_pretrained`` into ``directory``, without transformers' "Writing model
    shards" progress bar (it would print inside the training progress bar at every export).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32))
        >>> out = Path(tempfile.mkdtemp())
        >>> write_pretrained_files(model, None, out)
        >>> sorted(p.name for p in out.iterdir())
        ['config.json', 'generation_config.json', 'model.safetensors']
    """
    kwargs = {} if state_dict is None else {"state_dict": dict(state_dict)}
    with _no_transformers_progress_bars():
        model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if tokenizer is not None and callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(directory)


@contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
