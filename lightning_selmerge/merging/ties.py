"""Tied tensors: state-dict entries that view the same memory are one tensor to merge or check.

A tie group is merged once, and its random draws are keyed by one *canonical name*, the same in
every path that can merge it. That matters because the paths see different names for the group:

* an in-memory state dict (the in-process ensemble, :func:`merge_state_dicts`) holds every name
  of the group, e.g. GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``;
* a Hugging Face ``save_pretrained`` directory holds only the name that survives the save: the
  tie's *source*, the input embedding; the aliases tied to it (the output head) are dropped;
* a safetensors file written by ``safetensors.torch.save_model`` also keeps one name per group.

The canonical name is therefore the name that survives ``save_pretrained``, so that the same
replicas and seed give the same bits whichever path merges them. Without the model at hand it is
picked by rank, then by sorted order: names that Hugging Face ties *to* an embedding rank last
(:data:`OUTPUT_ALIASES`: ``lm_head``, ``embed_out``, ``cls.predictions.decoder``, ...), encoder and
decoder ``embed_tokens`` (tied to a ``shared`` embedding in T5 and BART) rank in the middle, every
other name first. The choice depends only on the group's set of names, never on the order of
the state dict's keys. A group seen in a file through one name is keyed by that name, which is
the canonical one whenever the file was written by ``save_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "OUTPUT_ALIASES",
    "SHARED_EMBEDDING_ALIASES",
    "canonical_name",
    "storage_key",
    "tie_groups",
]

#: Output heads that Hugging Face models tie to their input embedding (dropped on save).
OUTPUT_ALIASES = re.compile(
    r"(^|\.)(lm_head|embed_out|output|generator_lm_head|proj_out|pred_layer\.proj"
    r"|cls\.predictions\.decoder|lm_head\.decoder)\.(weight|bias)$"
)
#: Encoder/decoder embeddings tied to a ``shared`` embedding (T5, BART: dropped on save).
SHARED_EMBEDDING_ALIASES = re.compile(r"(^|\.)(encoder|decoder)\.embed_tokens\.weight$")


def _rank(name: str) -> int:
    if OUTPUT_ALIASES.search(name):
        return 2
    if SHARED_EMBEDDING_ALIASES.search(name):
        return 1
    return 0


def canonical_name(names: Iterable[str]) -> str:
    """The name a tie group's random draws are keyed by: the one ``save_pretrained`` keeps.

    Example:
        >>> canonical_name(["lm_head.weight", "transformer.wte.weight"])
        'transformer.wte.weight'
        >>> canonical_name(["lm_head.weight", "model.decoder.embed_tokens.weight"])  # OPT
        'model.decoder.embed_tokens.weight'
        >>> canonical_name(["encoder.embed_tokens.weight", "shared.weight", "lm_head.weight"])
        'shared.weight'
    """
    return min(names, key=lambda name: (_rank(name), name))


def storage_key(tensor: torch.Tensor) -> tuple:
    """Identifies the memory a tensor views: equal keys mean tied tensors.

    Two views that merely start at the same address (``w`` and ``w[:1]``) get different keys.
    """
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def tie_groups(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """``{canonical name: every name of its group}`` for the tensors of ``state``, in the order
    of the groups' first names in ``state`` (an untied tensor is a group of one).

    Example:
        >>> w = torch.zeros(2)
        >>> tie_groups({"lm_head.weight": w, "wte.weight": w, "b": torch.zeros(1)})
        {'wte.weight': ['lm_head.weight', 'wte.weight'], 'b': ['b']}
    """
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(storage_key(tensor), []).append(name)
    return {canonical_name(names): names for names in groups.values()}
