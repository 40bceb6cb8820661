"""Multi-turn conversations (a ``messages`` column, as TRL's conversational datasets) ->
causal-LM features with the loss on every assistant turn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_selmerge.hf.preprocess import IGNORE_INDEX

__all__ = ["conversation_features"]


def conversation_features(
    rows: Mapping[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    messages_field: str,
    max_length: int,
    system_prompt: str | None = None,
) -> dict[str, list[list[int]]]:
    """Tokenise a batch of conversations (``datasets.map(batched=True)``) through
    ``tokenizer``'s chat template, labelling the assistant turns only.

    Each row's ``messages_field`` is a list of ``{"role": ..., "content": ...}`` messages
    (``system_prompt``, when given, goes first unless the conversation starts with a system
    message). The conversation is rendered and tokenised at once, as it is at inference when
    it is the history; a token is labelled when it starts inside an assistant turn, i.e. what
    rendering the conversation up to that turn adds after the generation prompt (the answer
    and the template's end of turn). No EOS is appended; rows are cut to ``max_length``.

    Raises:
        ValueError: a row that is not a list of role/content messages, a template that
            renders a conversation's start differently once more turns follow, or a slow
            tokenizer (the labels need a fast tokenizer's character offsets).

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> tok = byte_tokenizer()
        >>> tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|"
        ...                      "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
        >>> chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
        ...         {"role": "user", "content": "Ok?"}, {"role": "assistant", "content": "Ok"}]
        >>> out = conversation_features({"messages": [chat]}, tok, "messages", 64)
        >>> tok.decode(out["input_ids"][0])
        'u:Hi|a:Yo|u:Ok?|a:Ok|'
        >>> tok.decode([i for i in out["labels"][0] if i != IGNORE_INDEX])
        'Yo|Ok|'
    """
    if not tokenizer.is_fast:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: labelling the assistant turns "
            "needs a fast one's character offsets; load the tokenizer with use_fast=True."
        )
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for index, value in enumerate(rows[messages_field]):
        messages = _messages(messages_field, index, value, system_prompt)
        text, spans = _assistant_spans(tokenizer, messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"][:max_length]
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, encoded["offset_mapping"])
        ]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def _messages(
    field: str, index: int, value: Any, system_prompt: str | None
) -> list[dict[str, Any]]:
    """A row's conversation, checked: role/content messages without the ``None`` keys other
    rows' messages give it in a ``datasets`` table; the system prompt first."""
    ok = isinstance(value, list) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in value
    )
    if not ok:
        raise ValueError(
            f"{field} of row {index} is not a list of {{'role': ..., 'content': ...}} messages: "
            f"{str(value)[:200]}; give each row a conversation (or use prompt_field and "
            "response_field for prompt/response pairs)."
        )
    messages = [{k: v for k, v in m.items() if v is not None} for m in value]
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(
            messages[:turn], add_generation_prompt=True, tokenize=False
        )
        upto = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not (upto.startswith(head) and text.startswith(upto)):
            raise ValueError(
                "The chat template is not prefix-consistent: it renders the conversation up "
                f"to assistant turn {turn} differently once more turns follow, so the turns "
                f"cannot be labelled.\nUp to the turn: {upto!r}\nWhole: {text[:500]!r}\nUse "
                "a template that renders earlier turns alike (chat_template='<Jinja template>')."
            )
        spans.append((len(head), len(upto)))
    return text, spans
