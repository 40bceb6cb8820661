"""Multi-turn conversations (a ``messages`` column, as TRL's conversational datasets) ->
causal-LM features with the loss on every assistant turn."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_selmerge.hf.preprocess import IGNORE_INDEX, _split_ids

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
    message). The conversation is rendered, then tokenised in pieces cut where an assistant
    turn starts and ends, each piece as it follows the one before (as :func:`~lightning_selmerge.
    hf.preprocess.chat_sft_features` tokenises a completion after its prompt), so no token spans
    the seam between a generation prompt and its answer (the prompt ends on the token it ends on
    at inference) and a one-turn conversation gives the prompt/response row. The assistant
    turns' tokens are labelled: what rendering the conversation up to each turn adds after the
    generation prompt (the answer and the template's end of turn). No EOS is appended; rows
    are cut to ``max_length``.

    Raises:
        ValueError: a row that is not a list of role/content messages, or a template that
            renders a conversation's start differently once more turns follow.

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
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for index, value in enumerate(rows[messages_field]):
        messages = _messages(messages_field, index, value, system_prompt)
        ids, labels = _labelled_ids(tokenizer, *_assistant_spans(tokenizer, messages))
        out["input_ids"].append(ids[:max_length])
        out["attention_mask"].append([1] * len(out["input_ids"][-1]))
        out["labels"].append(labels[:max_length])
    return out


def _labelled_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """``text``'s ids, tokenised in pieces cut at the ``spans``' ends, and its labels (the ids
    of the pieces inside the spans, :data:`IGNORE_INDEX` elsewhere)."""
    cuts = [0, *(cut for span in spans for cut in span), len(text)]
    pieces = [text[start:end] for start, end in pairwise(cuts)]
    _, tails = _split_ids(tokenizer, ["", *pieces[:-1]], pieces)  # the first piece alone
    ids: list[int] = []
    labels: list[int] = []
    for piece, piece_ids in enumerate(tails):
        ids += piece_ids
        labels += piece_ids if piece % 2 else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


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
