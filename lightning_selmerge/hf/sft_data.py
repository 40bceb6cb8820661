"""Prompt/response rows -> causal-LM batches for supervised fine-tuning (plain text or a chat
template), the loss on the responses."""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from lightning_selmerge.hf.cache_key import keyed_by_code
from lightning_selmerge.hf.conversations import conversation_features
from lightning_selmerge.hf.data import _TextDataModule, drop_missing_values
from lightning_selmerge.hf.preprocess import (
    IGNORE_INDEX,
    chat_sft_features,
    check_chat_options,
    check_system_prompt,
    end_of_turn_id,
    sft_features,
    template_fields,
    use_chat_template,
)

__all__ = ["SFTDataModule"]


def _has_target(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


class SFTDataModule(_TextDataModule):
    """Supervised fine-tuning data: prompt/response rows -> causal-LM batches, loss on responses.

    Each row becomes ``prefix + prompt_template.format(prompt=...) + response + EOS`` (the
    prefix: what the tokenizer puts before a text, e.g. Llama's BOS) or, with ``chat_template``,
    the conversation ``[system_prompt,] user: prompt_template.format(...), assistant: response``
    rendered by the tokenizer's chat template as TRL's SFTTrainer renders prompt-completion
    conversations (:func:`~lightning_selmerge.hf.preprocess.chat_sft_features`: no EOS added,
    the template's end of turn ends the answer), truncated to ``max_length`` tokens; ``labels``
    are the input ids with the prompt and the padding set to -100. With ``messages_field``,
    each row is a whole conversation instead (a list of role/content messages, as TRL's
    conversational datasets), rendered by the chat template and labelled on every assistant
    turn (:func:`~lightning_selmerge.hf.conversations.conversation_features`). Rows whose
    response is cut away entirely (or that hold no assistant turn) are dropped (with a
    warning). Batches: ``input_ids``, ``attention_mask``, ``labels`` (right-padded per batch
    with the tokenizer's pad id / -100, whatever the tokenizer's ``padding_side``) and, in
    training, ``sample_index``.

    Args:
        data_files: local file(s): a path, a list of paths, or ``{"train": ..., "validation":
            ...}``. Relative paths are read from the working directory.
        tokenizer_name_or_path: local tokenizer directory; ``None`` (default) uses the fitted
            module's ``tokenizer`` (see the module docstring).
        data_format: ``"json"`` (also .jsonl), ``"csv"``, ``"tsv"`` or ``"parquet"``; default
            inferred from the extension (compressed ``.gz``/``.zst``/... files too).
        prompt_field: column holding the prompt.
        response_field: column holding the response.
        prompt_template: ``str.format`` template of the prompt part (with ``chat_template``, of
            the user's message); ``{prompt}`` is the prompt column, and any column name may be
            used (e.g. ``"[{category}] {prompt}\\n"``). Default ``"{prompt}\\n"``, or
            ``"{prompt}"`` with ``chat_template``.
        chat_template: ``False`` (default): plain text as above. ``True``: render each row with
            the tokenizer's chat template (instruct checkpoints ship one). A string: a Jinja chat
            template set as the tokenizer's ``chat_template`` first (the module's tokenizer,
            when taken from it, so its exports carry the template).
        system_prompt: with ``chat_template``, a system message before each user message
            (before each conversation without one, with ``messages_field``); an error with a
            template that refuses a system role (Gemma's, Mistral's).
        messages_field: column holding multi-turn conversations (lists of ``{"role": ...,
            "content": ...}``), used instead of ``prompt_field``/``response_field``; needs
            ``chat_template``.
        max_length: maximum tokens per example (prompt + response + EOS).
        batch_size: examples per batch.
        val_fraction: share of the training rows held out for validation when there is no
            ``validation`` split / ``val_data_files``; 0 disables validation.
        val_data_files: separate validation file(s), in the same format.
        split_seed: seed of the validation split and of the ``limit_samples`` subset.
        num_workers: DataLoader worker processes.
        limit_samples: keep only a random subset of this many training-file rows (before
            the validation split), for quick runs.

    Example:
        >>> from lightning_selmerge.hf.loading import byte_tokenizer
        >>> dm = SFTDataModule(data_files="examples/data/chatterbot_pairs.jsonl",
        ...                    limit_samples=20, batch_size=4)
        >>> dm.tokenizer = byte_tokenizer()   # normally the module's, taken in setup()
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set)
        (18, 2)
        >>> sorted(next(iter(dm.train_dataloader())))
        ['attention_mask', 'input_ids', 'labels', 'sample_index']
    """

    causal = True

    def __init__(
        self,
        data_files: str | list[str] | dict,
        tokenizer_name_or_path: str | None = None,
        data_format: str | None = None,
        prompt_field: str = "prompt",
        response_field: str = "response",
        prompt_template: str | None = None,
        chat_template: bool | str = False,
        system_prompt: str | None = None,
        messages_field: str | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        val_data_files: str | list[str] | dict | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
        limit_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._init_common(
            data_files,
            tokenizer_name_or_path,
            data_format,
            max_length,
            batch_size,
            val_fraction,
            val_data_files,
            split_seed,
            num_workers,
            limit_samples,
        )
        check_chat_options(type(self).__name__, chat_template, system_prompt)
        _check_messages_options(type(self).__name__, messages_field, chat_template, prompt_template)
        self.messages_field = messages_field
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        if prompt_template is None:
            prompt_template = "{prompt}\n" if chat_template is False else "{prompt}"
        self.prompt_template = prompt_template

    def _tokenise(self, table: Dataset) -> Dataset:
        owner = type(self).__name__
        if self.messages_field is not None:
            table = drop_missing_values(owner, table, [self.messages_field])
            tokenised = table.map(
                keyed_by_code(conversation_features),
                batched=True,
                remove_columns=table.column_names,
                fn_kwargs={
                    "tokenizer": self.tokenizer,
                    "messages_field": self.messages_field,
                    "max_length": self.max_length,
                    "system_prompt": self.system_prompt,
                },
                desc=f"{owner}: tokenising",
            )
            return self._with_targets(tokenised)
        used = template_fields(self.prompt_template)
        missing = used - {"prompt", *table.column_names}
        if missing:
            raise ValueError(
                f"{owner}: prompt_template uses {sorted(missing)}, which are not columns; "
                f"use {{prompt}} or one of {table.column_names}."
            )
        fields = {self.prompt_field, self.response_field, *(used - {"prompt"})}
        table = drop_missing_values(owner, table, sorted(fields))
        kwargs = {
            "tokenizer": self.tokenizer,
            "prompt_field": self.prompt_field,
            "response_field": self.response_field,
            "prompt_template": self.prompt_template,
            "max_length": self.max_length,
        }
        if self.chat_template is not False:
            kwargs["system_prompt"] = self.system_prompt
        tokenised = table.map(
            keyed_by_code(sft_features if self.chat_template is False else chat_sft_features),
            batched=True,
            remove_columns=table.column_names,
            fn_kwargs=kwargs,
            desc=f"{owner}: tokenising",
        )
        return self._with_targets(tokenised)

    def _with_targets(self, tokenised: Dataset) -> Dataset:
        """The rows that keep a target token, the others dropped with a warning."""
        owner = type(self).__name__
        kept = tokenised.filter(
            _has_target, input_columns="labels", desc=f"{owner}: dropping rows without response"
        )
        if len(kept) < len(tokenised):
            rank_zero_warn(
                f"{owner}: dropped {len(tokenised) - len(kept)} of {len(tokenised)} rows whose "
                f"prompt fills max_length={self.max_length} (no response token left); raise "
                "max_length to keep them"
                + (" (or with no assistant turn)." if self.messages_field is not None else ".")
            )
        if len(kept) == 0:
            raise ValueError(
                f"{owner}: no row keeps a response token within max_length={self.max_length}."
            )
        return kept

    def _required_columns(self) -> dict[str, str]:
        if self.messages_field is not None:
            return {"messages_field": self.messages_field}
        return {"prompt_field": self.prompt_field, "response_field": self.response_field}

    def _text_columns(self) -> list[str]:
        used = template_fields(self.prompt_template) - {"prompt"}
        return [self.prompt_field, self.response_field, *sorted(used)]

    def _prepare(self, train: Dataset, val: Dataset | None) -> tuple[Dataset, Dataset | None]:
        if self.chat_template is not False:
            use_chat_template(type(self).__name__, self.tokenizer, self.chat_template)
            check_system_prompt(type(self).__name__, self.tokenizer, self.system_prompt)
        return self._tokenise(train), None if val is None else self._tokenise(val)

    def setup(self, stage: str | None = None) -> None:
        """As the base's, and (on every call: a datamodule set up before the fit, or reused
        for another module) the module's generation stops at the chat template's end of turn."""
        super().setup(stage)
        if self.chat_template is not False:
            self._stop_generation_at_end_of_turn()

    def _stop_generation_at_end_of_turn(self) -> None:
        """Add the template's end-of-turn token to the module's generation EOS ids when they
        lack it (a chat format taught to a base model), so its exports stop after an answer."""
        generation = getattr(getattr(self._module(), "model", None), "generation_config", None)
        end = end_of_turn_id(self.tokenizer)
        if generation is None or end is None:
            return
        stops = generation.eos_token_id
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        if end not in stops:
            generation.eos_token_id = [*stops, end]
            rank_zero_info(
                f"{type(self).__name__}: the chat template ends a turn with "
                f"{self.tokenizer.convert_ids_to_tokens(end)!r}, which generation did not stop "
                f"at: it does now (generation_config.eos_token_id={generation.eos_token_id})."
            )

    def _collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return DataCollatorForSeq2Seq(
            tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        )


def _check_messages_options(
    owner: str, messages_field: str | None, chat_template: bool | str, prompt_template: str | None
) -> None:
    """Raise on ``messages_field`` without a chat template, or with a ``prompt_template``."""
    if messages_field is None:
        return
    if chat_template is False:
        raise ValueError(
            f"{owner}: messages_field={messages_field!r} needs chat_template (true, or a "
            "template's text): conversations are rendered by it."
        )
    if prompt_template is not None:
        raise ValueError(
            f"{owner}: prompt_template applies to prompt/response rows; with messages_field "
            "the conversation's messages are used as they are: drop prompt_template."
        )
