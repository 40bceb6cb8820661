"""Rows -> model inputs: prompt/response pairs for SFT, texts and class ids for classifiers."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "added_prefix",
    "chat_sft_features",
    "check_chat_options",
    "check_system_prompt",
    "classification_features",
    "encode_prompt",
    "end_of_turn_id",
    "label_ids",
    "sft_features",
    "template_fields",
    "use_chat_template",
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
    prompt starts as ``tokenizer(prompt)`` starts it at inference; the response is tokenised as
    it follows the prompt (no SentencePiece ``▁`` before its first word unless the joined text
    has a space there). The template is ``str.format``-ed with ``prompt`` (the prompt field's
    value) and every column of the row.

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
    texts = _user_texts(rows, prompt_field, prompt_template)
    prefix = added_prefix(tokenizer)
    prompts, responses = _split_ids(tokenizer, texts, [str(r) for r in rows[response_field]])
    targets = [[*response, eos] for response in responses]
    return _masked([prefix + prompt for prompt in prompts], targets, max_length)


def chat_sft_features(
    rows: Mapping[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    prompt_field: str,
    response_field: str,
    prompt_template: str,
    max_length: int,
    system_prompt: str | None = None,
) -> dict[str, list[list[int]]]:
    """Tokenise a batch of rows for SFT through ``tokenizer``'s chat template.

    TRL's recipe for prompt-completion conversational data: the conversation is an optional
    system turn (``system_prompt``) and a user turn (``prompt_template`` formatted as in
    :func:`sft_features`); the prompt is it rendered with ``add_generation_prompt=True``, the
    completion what rendering it with the response as the assistant's turn adds after the prompt
    (the response and the template's end of turn). Both are tokenised with
    ``add_special_tokens=False`` (the template writes any BOS), the completion as it follows
    the prompt (as :func:`sft_features` does), and cut to ``max_length``
    together; ``labels`` are :data:`IGNORE_INDEX` over the prompt. As TRL does for
    conversational data, no EOS is appended: the template's end of turn (``<|im_end|>``,
    ``<|eot_id|>``, ...) ends the answer, so generation should stop on it.

    Raises:
        ValueError: the rendered conversation does not start with the rendered prompt (a
            template that is not prefix-consistent).

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> tok = byte_tokenizer()
        >>> tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|"
        ...     "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
        >>> out = chat_sft_features({"q": ["Hi"], "a": ["Yo"]}, tok, "q", "a", "{prompt}", 64)
        >>> tok.decode(out["input_ids"][0])
        'user: Hi|assistant: Yo|'
        >>> tok.decode([i for i in out["labels"][0] if i != IGNORE_INDEX])
        'Yo|'
    """
    chats = _chats(_user_texts(rows, prompt_field, prompt_template), system_prompt)
    prompts = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    fulls = tokenizer.apply_chat_template(
        [
            [*chat, {"role": "assistant", "content": str(response)}]
            for chat, response in zip(chats, rows[response_field])
        ],
        tokenize=False,
    )
    completions = []
    for prompt, full in zip(prompts, fulls):
        if not full.startswith(prompt):
            raise ValueError(
                "The chat template is not prefix-consistent: the conversation rendered with the "
                "response does not start with it rendered up to the generation prompt, so the "
                f"prompt cannot be masked.\nPrompt: {prompt!r}\nPrompt + response: {full!r}\n"
                "Use a template that renders the earlier turns alike (chat_template='<Jinja "
                "template>'), or chat_template=False."
            )
        completions.append(full[len(prompt) :])
    return _masked(*_split_ids(tokenizer, prompts, completions), max_length)


def check_chat_options(owner: str, chat_template: bool | str, system_prompt: str | None) -> None:
    """Raise on a ``chat_template`` string that is no Jinja template, or a ``system_prompt``
    without ``chat_template`` (it would be ignored)."""
    if isinstance(chat_template, str) and not ("{{" in chat_template or "{%" in chat_template):
        raise ValueError(
            f"{owner}: chat_template={chat_template!r} is not a Jinja template (no {{{{ }}}} nor "
            "{% %}); pass true (the tokenizer's template), false, or a template's text."
        )
    if system_prompt is not None and chat_template is False:
        raise ValueError(
            f"{owner}: system_prompt needs chat_template (true, or a template's text); without "
            "one, put the instruction in prompt_template."
        )


def use_chat_template(
    owner: str, tokenizer: PreTrainedTokenizerBase, chat_template: bool | str
) -> None:
    """Set a ``chat_template`` string as ``tokenizer``'s template; raise when it then has none.

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> use_chat_template("SFT", byte_tokenizer(), True)
        Traceback (most recent call last):
        ...
        ValueError: SFT: chat_template=True but the tokenizer has no chat template ...
    """
    if isinstance(chat_template, str):
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{owner}: chat_template=True but the tokenizer has no chat template "
            "(tokenizer.chat_template is None); pass the template's text as chat_template, or use "
            "a tokenizer directory that has one (an instruct checkpoint's)."
        )


def check_system_prompt(
    owner: str, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None
) -> None:
    """Raise, with the fix, when ``tokenizer``'s chat template refuses a system message
    (Gemma's and Mistral's raise a Jinja ``TemplateError``) and ``system_prompt`` is given."""
    from jinja2.exceptions import TemplateError  # chat templates need jinja2 (an extra)

    if system_prompt is None:
        return
    chat = _chats(["a"], system_prompt)[0]
    try:
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:
        raise ValueError(
            f"{owner}: the chat template refuses a system message ({err}); drop system_prompt "
            "and put the instruction in the user's message (prompt_template, e.g. "
            "'Be brief.\\n\\n{prompt}'), or use a template with a system role."
        ) from err


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token ``tokenizer``'s chat template closes an assistant turn with (ChatML's
    ``<|im_end|>``, Llama-3's ``<|eot_id|>``), EOS included: generation must stop there, and
    a base model's generation config may stop at another EOS (Llama-3's ``<|end_of_text|>``,
    with the instruct tokenizer's EOS ``<|eot_id|>``). ``None`` when no special token ends it.

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> tok = byte_tokenizer()
        >>> tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
        1
        >>> tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"
        >>> end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|end|>")
        True
    """
    chat = _chats(["a"], None)[0]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*chat, {"role": "assistant", "content": "b"}], tokenize=False
    )
    turn_end = full[len(prompt) :].partition("b")[2]  # after the response
    special = set(tokenizer.all_special_ids) | {  # Llama-3's <|eot_id|> is only an added one
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    ids = [i for i in tokenizer(turn_end, add_special_tokens=False)["input_ids"] if i in special]
    return ids[0] if ids else None


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    prompt_template: str | None = None,
    chat_template: bool | str = False,
    system_prompt: str | None = None,
    **columns: Any,
) -> list[int]:
    """The token ids SFT training put before the response of ``prompt``: what to generate
    from, given the :class:`~lightning_selmerge.hf.SFTDataModule` settings of the fit
    (``prompt_template``, default ``"{prompt}\\n"`` or ``"{prompt}"`` with ``chat_template``;
    ``columns``: the template's other fields). Plain text starts with the tokenizer's
    :func:`added_prefix` and ends with the template, with no EOS or separator after it (a
    BERT tokenizer's ``[SEP]`` is a causal LM's EOS); a chat ends with the generation prompt.

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> tok = byte_tokenizer()
        >>> tok.decode(encode_prompt(tok, "Hi", "Q: {prompt} ({topic})\\nA:", topic="greeting"))
        'Q: Hi (greeting)\\nA:'
    """
    if prompt_template is None:
        prompt_template = "{prompt}" if chat_template else "{prompt}\n"
    text = _user_texts(
        {**{k: [v] for k, v in columns.items()}, "prompt": [prompt]}, "prompt", prompt_template
    )
    if not chat_template:
        return added_prefix(tokenizer) + tokenizer(text[0], add_special_tokens=False)["input_ids"]
    (chat,) = _chats(text, system_prompt)
    template = chat_template if isinstance(chat_template, str) else None  # else the tokenizer's
    rendered = tokenizer.apply_chat_template(
        chat, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _split_ids(
    tokenizer: PreTrainedTokenizerBase, heads: list[str], tails: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Each ``head`` tokenised alone (as at inference) and its ``tail`` as the tokenizer reads
    it after the head (``head + tail`` tokenised at once, the head's ids cut off), so a
    SentencePiece tokenizer does not start the tail with a word boundary (``▁``) the joined
    text does not have; where tokenising them at once changes the head's own ids (a token
    across the seam), the tail is tokenised alone."""
    head_ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    joined_ids = tokenizer([h + t for h, t in zip(heads, tails)], add_special_tokens=False)[
        "input_ids"
    ]
    tail_ids: list[list[int] | None] = [
        joined[len(head) :] if joined[: len(head)] == head else None
        for head, joined in zip(head_ids, joined_ids)
    ]
    alone = [i for i, ids in enumerate(tail_ids) if ids is None]
    if alone:
        ids = tokenizer([tails[i] for i in alone], add_special_tokens=False)["input_ids"]
        for i, tail in zip(alone, ids):
            tail_ids[i] = tail
    return head_ids, tail_ids  # type: ignore[return-value]


def _chats(texts: list[str], system_prompt: str | None) -> list[list[dict[str, str]]]:
    """One conversation per user text, after the system message when there is one."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [[*system, {"role": "user", "content": text}] for text in texts]


def _user_texts(rows: Mapping[str, list[Any]], prompt_field: str, template: str) -> list[str]:
    """``template`` formatted per row with ``prompt`` (the prompt field) and every column."""
    columns = list(rows)
    return [
        template.format(**{**{c: rows[c][i] for c in columns}, "prompt": rows[prompt_field][i]})
        for i in range(len(rows[prompt_field]))
    ]


def _masked(
    heads: list[list[int]], targets: list[list[int]], max_length: int
) -> dict[str, list[list[int]]]:
    """``head + target`` cut to ``max_length``, labelled on the target only."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for head, target in zip(heads, targets):
        ids = (head + target)[:max_length]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(([IGNORE_INDEX] * len(head) + target)[:max_length])
    return out


def added_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens ``tokenizer`` puts before a text (``add_special_tokens=True``).

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> added_prefix(byte_tokenizer())  # no special tokens around a text
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
    ``label_names`` is ``None``; int labels stay as they are (checked against ``label_names``),
    as do whole floats (``1.0``: a CSV int column with an empty cell, a JSON ``1.0``).

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
    if all(isinstance(v, float) and v.is_integer() for v in values):
        values = [int(v) for v in values]  # an int column with an empty cell reads as floats
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
