"""Rows -> model inputs: prompt/response pairs for SFT, texts and class ids for classifiers."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "added_prefix",
    "classification_features",
    "label_ids",
    "sft_features",
    "template_fields",
]

#: label value that the losses skip.
IGNORE_INDEX = -100


def template_fields(template: str) -> set[str]:
    """The ``{names}`` a ``str.format`` template uses.

    Example:
        >>> sorted(template_fields("### Q ({category}): {prompt}\\n### A: "))
        ['category', 'prompt']
    """
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def sft_features(
    rows: Mapping[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    prompt_field: str,
    response_field: str,
    prompt_template: str,
    max_length: int,
) -> dict[str, list[list[int]]]:
    """Tokenise a batch of rows (``datasets.map(batched=True)``) for supervised fine-tuning.

    Each example is ``prefix + template(prompt) + response + EOS`` cut to ``max_length``
    tokens; ``labels`` copy the ids with the prompt part set to :data:`IGNORE_INDEX`, so the
    loss covers only the response (and its EOS). ``prefix`` is what the tokenizer itself puts
    before a text (:func:`added_prefix`: Llama's BOS, OPT's ``</s>``, none for GPT-2), so a
    prompt starts as ``tokenizer(prompt)`` starts it at inference. The template is
    ``str.format``-ed with ``prompt`` (the prompt field's value) and every column of the row.

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> out = sft_features({"q": ["Hi"], "a": ["Yo"]}, byte_tokenizer(), "q", "a",
        ...                    "{prompt}:", 16)
        >>> out["input_ids"][0], out["labels"][0]
        ([75, 108, 61, 92, 114, 1], [-100, -100, -100, 92, 114, 1])
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no EOS token (nor a separator to use as one), "
            "which ends every response: give a tokenizer that has one (tokenizer_name_or_path), "
            "or set tokenizer.eos_token in Python before the fit."
        )
    prefix = added_prefix(tokenizer)
    columns = list(rows)
    count = len(rows[prompt_field])
    prompts = [
        prompt_template.format(
            **{**{c: rows[c][i] for c in columns}, "prompt": rows[prompt_field][i]}
        )
        for i in range(count)
    ]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    responses = [str(r) for r in rows[response_field]]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in zip(prompt_ids, response_ids):
        head = prefix + prompt
        ids = (head + response + [eos])[:max_length]
        labels = ([IGNORE_INDEX] * len(head) + response + [eos])[:max_length]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def added_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens ``tokenizer`` puts before a text (``add_special_tokens=True``).

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> added_prefix(byte_tokenizer())  # ByT5-style: an EOS after the text, nothing before
        []
    """
    probe = "a"
    marked = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return list(marked[:start])
    return []


def classification_features(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Any:
    """Tokenise a batch of texts with special tokens, truncated to ``max_length`` tokens."""
    return tokenizer(texts, truncation=True, max_length=max_length)


def label_ids(
    owner: str, values: Iterable[Any], label_names: Sequence[str] | None
) -> tuple[list[int], list[str] | None]:
    """Class ids for a label column, and the class names (``None`` for unnamed int labels).

    String labels map to their index in ``label_names``, or in the sorted distinct values when
    ``label_names`` is ``None``; int labels stay as they are (checked against ``label_names``).

    Example:
        >>> label_ids("X", ["b", "a", "b"], None)
        ([1, 0, 1], ['a', 'b'])
        >>> label_ids("X", ["pos", "neg"], ["pos", "neg"])
        ([0, 1], ['pos', 'neg'])
    """
    values = list(values)
    names = list(label_names) if label_names is not None else None
    if all(isinstance(v, str) for v in values):
        if names is None:
            names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(
                f"{owner}: labels {unknown[:10]} are not in label_names={names}; add them to "
                "label_names (or leave label_names unset to use the sorted distinct labels)."
            )
        return [index[v] for v in values], names
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = sorted({v for v in values if v < 0 or (names is not None and v >= len(names))})
        if bad:
            limit = f"< {len(names)} (len(label_names))" if names is not None else ">= 0"
            raise ValueError(
                f"{owner}: int labels {bad[:10]} are out of range; they must be {limit}."
            )
        return values, names
    kinds = sorted({type(v).__name__ for v in values})
    raise ValueError(
        f"{owner}: the label column holds {kinds}; labels must be all strings (class names) or "
        "all ints (class ids)."
    )
