"""The base of the text DataModules (:class:`~lightning_selmerge.hf.SFTDataModule`,
:class:`~lightning_selmerge.hf.ClassificationDataModule`): local data files loaded with
``datasets``, split, tokenised once, batched with ``transformers`` collators.

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
from transformers import PreTrainedTokenizerBase

from lightning_selmerge.data.indexed import IndexedDataset
from lightning_selmerge.hf.files import (
    DataFiles,
    infer_format,
    load_table,
    require_columns,
    require_files,
    require_splits,
    train_val_split,
)
from lightning_selmerge.hf.loading import ensure_pad_token, ensure_sequence_tokens, load_tokenizer

__all__ = ["drop_missing_values"]


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
        require_splits(owner, data_files, "data_files")
        if val_data_files is not None:
            infer_format(owner, val_data_files, data_format)
            require_files(owner, val_data_files, "val_data_files")
            require_splits(owner, val_data_files, "val_data_files")
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

    def _text_columns(self) -> list[str]:
        """The columns read as text (a CSV column of numbers stays as written)."""
        return []

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
        text = self._text_columns()
        tables = load_table(owner, self.data_files, self.data_format, text)
        train = _split(owner, tables, "train", "data_files")
        require_columns(owner, train, **self._required_columns())
        if self.limit_samples is not None and self.limit_samples < len(train):
            train = train.shuffle(seed=self.split_seed).select(range(self.limit_samples))
        if self.val_data_files is not None:
            val_tables = load_table(owner, self.val_data_files, self.data_format, text)
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


def _split(owner: str, tables: DatasetDict, name: str, argument: str) -> Dataset:
    if name not in tables:
        raise ValueError(
            f"{owner}: {argument} has splits {list(tables)} but no {name!r}; name the training "
            f"files {{'train': ..., 'validation': ...}} or pass a path or list of paths."
        )
    return tables[name]


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
