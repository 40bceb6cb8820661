"""Text/label rows -> sequence-classification batches with class ids."""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightning_selmerge.hf.cache_key import keyed_by_code
from lightning_selmerge.hf.data import _TextDataModule, drop_missing_values
from lightning_selmerge.hf.preprocess import classification_features, label_ids

__all__ = ["ClassificationDataModule"]


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

    def _text_columns(self) -> list[str]:
        return [self.text_field]

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
            keyed_by_code(classification_features),
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
