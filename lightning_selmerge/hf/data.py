"""LightningDataModules over local data files, built on ``datasets`` and ``transformers`` collators.

**Tokenizer contract.** A DataModule tokenises with the tokenizer at ``tokenizer_name_or_path``
(local); when that is ``None`` it takes the tokenizer of the LightningModule it is fitted with
(``trainer.lightning_module.tokenizer``, e.g. :class:`~lightning_selmerge.hf.CausalLMModule`'s) in
:meth:`setup`, so model and data cannot disagree. To use one outside a Trainer, set
``datamodule.tokenizer = ...`` before calling ``setup()``.

Training batches carry ``sample_index`` (the row's index in :attr:`train_set`), as the package's
batch contract asks (:mod:`lightning_selmerge.data.indexed`).
"""

from __future__ import annotations

import copy
from typing import Any

from datasets import Dataset, DatasetDict
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from lightning_selmerge.data.indexed import IndexedDataset
from lightning_selmerge.hf.files import (
    DataFiles,
    infer_format,
    load_table,
    require_columns,
    require_files,
    train_val_split,
)
from lightning_selmerge.hf.loading import ensure_pad_token, ensure_sequence_tokens, load_tokenizer
from lightning_selmerge.hf.preprocess import (
    IGNORE_INDEX,
    chat_sft_features,
    check_chat_options,
    classification_features,
    label_ids,
    sft_features,
    template_fields,
    use_chat_template,
)

__all__ = ["ClassificationDataModule", "SFTDataModule"]


class _TextDataModule(LightningDataModule):
    """Loading, splitting, tokenizer resolution and loaders; subclasses tokenise the rows."""

    #: whether the rows train a causal LM (its tokenizer needs an EOS to end responses)
    causal = False

    def _init_common(
        self,
        data_files: DataFiles,
        tokenizer_name_or_path: str | None,
        data_format: str | None,
        max_length: int,
        batch_size: int,
        val_fraction: float,
        val_data_files: DataFiles | None,
        split_seed: int,
        num_workers: int,
        limit_samples: int | None,
    ) -> None:
        owner = type(self).__name__
        for name, value, low in (
            ("max_length", max_length, 2),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("limit_samples", limit_samples, 1),
        ):
            if value is not None and value < low:
                raise ValueError(f"{owner}: {name}={value} must be >= {low}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{owner}: val_fraction={val_fraction} must be in [0, 1).")
        # unknown extensions and missing files fail here, before a Trainer is built
        infer_format(owner, data_files, data_format)
        require_files(owner, data_files, "data_files")
        if val_data_files is not None:
            infer_format(owner, val_data_files, data_format)
            require_files(owner, val_data_files, "val_data_files")
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.data_files = data_files
        self.data_format = data_format
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.val_data_files = val_data_files
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.limit_samples = limit_samples
        #: the tokenizer in use (set in :meth:`setup`, or by you beforehand).
        self.tokenizer: PreTrainedTokenizerBase | None = None
        #: the tokenised training rows (after :meth:`setup`); ``sample_index`` indexes them.
        self.train_set: Dataset | None = None
        #: the tokenised validation rows, or ``None`` without a validation set.
        self.val_set: Dataset | None = None
        self.collate_fn: Any = None

    # -- subclass hooks -------------------------------------------------------------------
    def _required_columns(self) -> dict[str, str]:
        """``{argument name: column}`` that every data file must have."""
        raise NotImplementedError

    def _prepare(self, train: Dataset, val: Dataset | None) -> tuple[Dataset, Dataset | None]:
        raise NotImplementedError

    def _collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, load and split the files, tokenise (once; later calls no-op)."""
        if self.train_set is not None:
            return
        tokenizer = self._resolve_tokenizer()
        self._check_max_length()
        train, val = self._load_raw()
        self.train_set, self.val_set = self._prepare(train, val)
        self.collate_fn = self._collator(_right_padding(tokenizer))

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches with ``sample_index`` (``DataOrderEnsemble`` replaces the sampler)."""
        return DataLoader(
            IndexedDataset(self._ready(self.train_set)),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order; an empty list (no validation) without a val set."""
        self._ready(self.train_set)
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )

    # -- helpers --------------------------------------------------------------------------
    def _ready(self, dataset: Dataset | None) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for loaders.")
        return dataset

    def _module(self) -> Any:
        trainer = self.trainer
        return None if trainer is None else trainer.lightning_module

    def _model_config(self) -> Any | None:
        """The config of the module's Hugging Face model (``module.model.config``), if any."""
        return getattr(getattr(self._module(), "model", None), "config", None)

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        owner = type(self).__name__
        if self.tokenizer is None and self.tokenizer_name_or_path is not None:
            self.tokenizer = load_tokenizer(owner, self.tokenizer_name_or_path)
            if self.causal:  # as CausalLMModule loads it: an encoder's [SEP] ends responses
                ensure_sequence_tokens(owner, self.tokenizer)
        if self.tokenizer is None:
            self.tokenizer = getattr(self._module(), "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(
                f"{owner} has no tokenizer: pass tokenizer_name_or_path, fit it with a module "
                "that has a `tokenizer` attribute (CausalLMModule, SequenceClassificationModule), "
                "or set datamodule.tokenizer before setup()."
            )
        ensure_pad_token(self.tokenizer)
        return self.tokenizer

    def _check_max_length(self) -> None:
        limit = getattr(self._model_config(), "max_position_embeddings", None)
        if isinstance(limit, int) and self.max_length > limit:
            raise ValueError(
                f"{type(self).__name__}: max_length={self.max_length} exceeds the model's "
                f"{limit} positions (max_position_embeddings); set max_length <= {limit}."
            )

    def _load_raw(self) -> tuple[Dataset, Dataset | None]:
        owner = type(self).__name__
        tables = load_table(owner, self.data_files, self.data_format)
        train = _split(owner, tables, "train", "data_files")
        require_columns(owner, train, **self._required_columns())
        if self.limit_samples is not None and self.limit_samples < len(train):
            train = train.shuffle(seed=self.split_seed).select(range(self.limit_samples))
        if self.val_data_files is not None:
            val_tables = load_table(owner, self.val_data_files, self.data_format)
            name = "validation" if "validation" in val_tables else "train"
            val = _split(owner, val_tables, name, "val_data_files")
        elif "validation" in tables:
            val = tables["validation"]
        else:
            return train_val_split(owner, train, self.val_fraction, self.split_seed)
        require_columns(owner, val, **self._required_columns())
        return train, val


def _right_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer``, or a shallow copy padding on the right when it pads on the left.

    Batches carry no ``position_ids``: left padding would shift the positions of absolute-position
    models (GPT-2, BERT), so an example's loss would depend on its batch-mates. The user's
    tokenizer keeps its ``padding_side`` (generation wants left padding).
    """
    if tokenizer.padding_side == "right":
        return tokenizer
    right = copy.copy(tokenizer)
    right.padding_side = "right"
    return right


def _has_target(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def _split(owner: str, tables: DatasetDict, name: str, argument: str) -> Dataset:
    if name not in tables:
        raise ValueError(
            f"{owner}: {argument} has splits {list(tables)} but no {name!r}; name the training "
            f"files {{'train': ..., 'validation': ...}} or pass a path or list of paths."
        )
    return tables[name]


class SFTDataModule(_TextDataModule):
    """Supervised fine-tuning data: prompt/response rows -> causal-LM batches, loss on responses.

    Each row becomes ``prefix + prompt_template.format(prompt=...) + response + EOS`` (the
    prefix: what the tokenizer puts before a text, e.g. Llama's BOS) or, with ``chat_template``,
    the conversation ``[system_prompt,] user: prompt_template.format(...), assistant: response``
    rendered by the tokenizer's chat template as TRL's SFTTrainer renders prompt-completion
    conversations (:func:`~lightning_selmerge.hf.preprocess.chat_sft_features`: no EOS added,
    the template's end of turn ends the answer), truncated to ``max_length`` tokens; ``labels``
    are the input ids with the prompt and the padding set to -100. Rows whose response is cut
    away entirely are dropped (with a warning). Batches: ``input_ids``, ``attention_mask``,
    ``labels`` (right-padded per batch with the tokenizer's pad id / -100, whatever the
    tokenizer's ``padding_side``) and, in training, ``sample_index``.

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
        system_prompt: with ``chat_template``, a system message before each user message.
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
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        if prompt_template is None:
            prompt_template = "{prompt}\n" if chat_template is False else "{prompt}"
        self.prompt_template = prompt_template

    def _tokenise(self, table: Dataset) -> Dataset:
        owner = type(self).__name__
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
            sft_features if self.chat_template is False else chat_sft_features,
            batched=True,
            remove_columns=table.column_names,
            fn_kwargs=kwargs,
            desc=f"{owner}: tokenising",
        )
        kept = tokenised.filter(
            _has_target, input_columns="labels", desc=f"{owner}: dropping rows without response"
        )
        if len(kept) < len(tokenised):
            rank_zero_warn(
                f"{owner}: dropped {len(tokenised) - len(kept)} of {len(tokenised)} rows whose "
                f"prompt fills max_length={self.max_length} (no response token left); raise "
                "max_length to keep them."
            )
        if len(kept) == 0:
            raise ValueError(
                f"{owner}: no row keeps a response token within max_length={self.max_length}."
            )
        return kept

    def _required_columns(self) -> dict[str, str]:
        return {"prompt_field": self.prompt_field, "response_field": self.response_field}

    def _prepare(self, train: Dataset, val: Dataset | None) -> tuple[Dataset, Dataset | None]:
        if self.chat_template is not False:
            use_chat_template(type(self).__name__, self.tokenizer, self.chat_template)
        return self._tokenise(train), None if val is None else self._tokenise(val)

    def _collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return DataCollatorForSeq2Seq(
            tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        )


class ClassificationDataModule(_TextDataModule):
    """Text classification data: text/label rows -> batches with class ids in ``labels``.

    String labels are mapped to ids by their position in ``label_names``, else in the model's
    own class names (a classifier checkpoint's ``id2label``, when they name every label), else
    in the sorted distinct labels of the training and validation rows; int labels are used as
    they are. After :meth:`setup`, :attr:`label_names` holds the class names (``None`` for
    unnamed int labels), and the module's model config names its classes with them
    (``id2label``, ``label2id``).
    Texts are tokenised with the tokenizer's special tokens and truncated to ``max_length``;
    batches are right-padded, whatever the tokenizer's ``padding_side``.

    Args:
        data_files: local file(s): a path, a list of paths, or ``{"train": ..., "validation":
            ...}``. Relative paths are read from the working directory.
        tokenizer_name_or_path: local tokenizer directory; ``None`` (default) uses the fitted
            module's ``tokenizer`` (see the module docstring).
        data_format: ``"json"`` (also .jsonl), ``"csv"``, ``"tsv"`` or ``"parquet"``; default
            inferred from the extension.
        text_field: column holding the text.
        label_field: column holding the label (class name or class id).
        label_names: class names in id order; default the sorted distinct string labels.
        max_length: maximum tokens per text.
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
        >>> dm = ClassificationDataModule(data_files="examples/data/chatterbot_topics.tsv",
        ...                               label_field="category", limit_samples=50)
        >>> dm.tokenizer = byte_tokenizer()   # normally the module's, taken in setup()
        >>> dm.setup("fit")
        >>> len(dm.label_names) > 2, len(dm.train_set), len(dm.val_set)
        (True, 45, 5)
    """

    def __init__(
        self,
        data_files: str | list[str] | dict,
        tokenizer_name_or_path: str | None = None,
        data_format: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        label_names: list[str] | None = None,
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
        if label_names is not None and len(set(label_names)) != len(label_names):
            raise ValueError(f"ClassificationDataModule: label_names {label_names} repeat a name.")
        self.text_field = text_field
        self.label_field = label_field
        #: class names in id order (after :meth:`setup`; ``None`` for unnamed int labels).
        self.label_names: list[str] | None = None if label_names is None else list(label_names)
        self._num_classes: int | None = None

    @property
    def num_labels(self) -> int:
        """Number of classes: ``len(label_names)``, or the largest int label + 1 (after setup)."""
        if self._num_classes is None:
            raise RuntimeError(f"{type(self).__name__}: num_labels is known after setup().")
        return self._num_classes

    def _required_columns(self) -> dict[str, str]:
        return {"text_field": self.text_field, "label_field": self.label_field}

    def _prepare(self, train: Dataset, val: Dataset | None) -> tuple[Dataset, Dataset | None]:
        owner = type(self).__name__
        fields = [self.text_field, self.label_field]
        train = drop_missing_values(owner, train, fields)
        val = None if val is None else drop_missing_values(owner, val, fields)
        tables = [train] if val is None else [train, val]
        values = [v for table in tables for v in table[self.label_field]]
        names = self.label_names
        if names is None:
            names = self._model_label_names(values)
        ids, self.label_names = label_ids(owner, values, names)
        self._num_classes = len(self.label_names) if self.label_names is not None else max(ids) + 1
        self._check_num_labels()
        self._name_model_labels()
        out = []
        start = 0
        for table in tables:
            labels = ids[start : start + len(table)]
            start += len(table)
            out.append(self._tokenise(table, labels))
        return out[0], (out[1] if val is not None else None)

    def _tokenise(self, table: Dataset, labels: list[int]) -> Dataset:
        tokenizer = self.tokenizer
        assert tokenizer is not None
        encoded = table.select_columns([self.text_field]).map(
            classification_features,
            batched=True,
            input_columns=self.text_field,
            remove_columns=[self.text_field],
            fn_kwargs={"tokenizer": tokenizer, "max_length": self.max_length},
            desc=f"{type(self).__name__}: tokenising",
        )
        return encoded.add_column("labels", labels)

    def _check_num_labels(self) -> None:
        expected = getattr(self._module(), "num_labels", None)
        classes = self.num_labels
        if isinstance(expected, int) and classes > expected:
            names = f" {self.label_names}" if self.label_names is not None else ""
            raise ValueError(
                f"{type(self).__name__}: the data has {classes} classes{names} but the module "
                f"was built with num_labels={expected}; set the module's num_labels={classes}."
            )

    def _model_label_names(self, values: list[Any]) -> list[str] | None:
        """The class names a classifier checkpoint was trained with (its config's ``id2label``,
        when not transformers' default ``LABEL_k``) if they name every string label of the
        data: continuing to train it keeps its classes' ids (as transformers' text
        classification example does); else ``None`` (the sorted labels), with a warning."""
        id2label = dict(getattr(self._model_config(), "id2label", None) or {})
        names = [str(id2label[i]) for i in sorted(id2label)]
        if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
            return None
        if not all(isinstance(v, str) for v in values):
            return None
        unknown = sorted(set(values) - set(names))
        if unknown:
            rank_zero_warn(
                f"{type(self).__name__}: the model's classes {names} do not name the data's "
                f"labels {unknown[:5]}: the labels get the sorted order and the model's names "
                "are replaced; give label_names to choose the ids."
            )
            return None
        return names

    def _name_model_labels(self) -> None:
        """Give the module's model config the class names (``id2label``/``label2id``, as
        transformers' text-classification example does), so its exports and pipelines name the
        classes instead of ``LABEL_k``; ids the data does not use keep their names."""
        config = self._model_config()
        if self.label_names is None or not hasattr(config, "id2label"):
            return
        names = list(self.label_names)
        id2label = dict(enumerate(names))
        for i in range(len(names), len(config.id2label)):
            # an id beyond the data's keeps its name unless the data names a class so
            kept = str(config.id2label.get(i, f"LABEL_{i}"))
            id2label[i] = kept if kept not in names else f"LABEL_{i}"
        config.id2label = id2label
        config.label2id = {name: i for i, name in id2label.items()}

    def _collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def drop_missing_values(owner: str, table: Dataset, fields: list[str]) -> Dataset:
    """``table`` without the rows missing a value in ``fields`` (an empty CSV cell, a JSON
    ``null``), with a warning naming how many: they would train as the text "None"."""
    kept = table.filter(
        lambda *values: all(v is not None for v in values),
        input_columns=fields,
        desc=f"{owner}: dropping rows with missing values",
    )
    if len(kept) < len(table):
        rank_zero_warn(
            f"{owner}: dropped {len(table) - len(kept)} of {len(table)} rows missing a value in "
            f"{fields} (an empty cell or a null); fill them in to keep those rows."
        )
    if len(kept) == 0 and len(table):
        raise ValueError(f"{owner}: every row misses a value in {fields}.")
    return kept
