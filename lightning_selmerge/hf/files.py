"""Load local data files (json/jsonl, csv, tsv, parquet) as ``datasets.Dataset`` tables."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from datasets import Dataset, DatasetDict, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

__all__ = [
    "DataFiles",
    "infer_format",
    "load_table",
    "require_columns",
    "require_files",
    "require_splits",
    "train_val_split",
]

#: ``data_files`` as ``load_dataset`` takes them: a path, a list of paths, or split -> path(s).
DataFiles = str | list[str] | dict

_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
#: ``data_format`` values: a ``datasets`` packaged builder, or ``tsv`` (csv with tabs).
FORMATS = ("json", "csv", "tsv", "parquet")


def _paths(data_files: DataFiles) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, Mapping):
        return [p for value in data_files.values() for p in _paths(value)]
    if isinstance(data_files, Sequence):
        return [str(p) for p in data_files]
    raise TypeError(
        f"data_files must be a path, a list of paths or a dict of split -> path(s), got "
        f"{type(data_files).__name__}."
    )


def infer_format(owner: str, data_files: DataFiles, data_format: str | None = None) -> str:
    """``data_format`` if given (checked), else the format named by the files' extension.

    Example:
        >>> infer_format("X", ["a.jsonl", "b.json.gz"])
        'json'
        >>> infer_format("X", {"train": "t.tsv"})
        'tsv'
    """
    if data_format is not None:
        if data_format not in FORMATS:
            raise ValueError(f"{owner}: data_format={data_format!r} is not one of {FORMATS}.")
        return data_format
    paths = _paths(data_files)
    if not paths:
        raise ValueError(f"{owner}: data_files names no file.")
    found = set()
    for path in paths:
        suffixes = [s.lower() for s in PurePath(path).suffixes]
        while suffixes and suffixes[-1] in _COMPRESSION:
            suffixes.pop()
        ext = suffixes[-1] if suffixes else ""
        if ext not in _EXTENSIONS:
            raise ValueError(
                f"{owner}: cannot tell the format of {path!r} from its extension {ext!r}; "
                f"name files *.json, *.jsonl, *.csv, *.tsv or *.parquet, or pass data_format "
                f"(one of {FORMATS})."
            )
        found.add(_EXTENSIONS[ext])
    if len(found) > 1:
        raise ValueError(
            f"{owner}: data_files mix formats {sorted(found)}; use one format, or pass "
            "data_format explicitly."
        )
    return found.pop()


def require_files(owner: str, data_files: DataFiles, argument: str = "data_files") -> None:
    """Raise ``FileNotFoundError`` naming the first local file (or glob) that matches nothing.

    Called when a DataModule is built, so a wrong path fails before any Trainer or model is.
    Remote URLs (``scheme://...``) are left to ``datasets``.

    Example:
        >>> require_files("X", "no/such.jsonl")
        Traceback (most recent call last):
        ...
        FileNotFoundError: X: data file 'no/such.jsonl' does not exist ...
    """
    for path in _paths(data_files):
        if "://" in path:
            continue
        pattern = any(char in path for char in "*?[")
        if glob.glob(path) if pattern else Path(path).exists():
            continue
        where = "" if os.path.isabs(path) else f" (relative paths are read from {os.getcwd()})"
        raise FileNotFoundError(
            f"{owner}: data file {path!r} does not exist{where}; fix {argument} "
            f"(command line: --data.init_args.{argument}=PATH)."
        )


def require_splits(owner: str, data_files: DataFiles, argument: str = "data_files") -> None:
    """Raise ``ValueError`` when a dict of ``data_files`` names a split other than ``"train"``
    and ``"validation"``: any other (``"test"``, ``"val"``) would be ignored without a word.

    Example:
        >>> require_splits("X", {"train": "t.csv", "val": "v.csv"})
        Traceback (most recent call last):
        ...
        ValueError: X: data_files has splits ['val'], which would be ignored...
    """
    if not isinstance(data_files, Mapping):
        return
    unknown = sorted(str(name) for name in data_files if name not in ("train", "validation"))
    if unknown:
        raise ValueError(
            f"{owner}: {argument} has splits {unknown}, which would be ignored: only 'train' "
            "and 'validation' are read; name the files {'train': ..., 'validation': ...}."
        )


def load_table(
    owner: str, data_files: DataFiles, data_format: str | None, text_columns: Sequence[str] = ()
) -> DatasetDict:
    """``datasets.load_dataset`` on local files; a plain path or list becomes split ``"train"``.

    CSV/TSV ``text_columns`` are read as written: pandas would read a column of numbers as
    numbers (``02139`` -> ``2139.0``), so such a file is read again with them as strings. Only an
    empty CSV/TSV cell is a missing value: pandas' default would also drop a row answering
    ``N/A``, ``None``, ``NA`` or ``null``.
    """
    fmt = infer_format(owner, data_files, data_format)
    builder = "csv" if fmt == "tsv" else fmt
    kwargs: dict[str, Any] = {"delimiter": "\t"} if fmt == "tsv" else {}
    if builder == "csv":  # an empty cell is missing; "N/A", "None", "null" are text
        kwargs.update(keep_default_na=False, na_values=[""])
    files = dict(data_files) if isinstance(data_files, Mapping) else data_files
    try:
        tables = load_dataset(builder, data_files=files, **kwargs)
        features = next(iter(tables.values())).features.copy() if tables else None
        numeric = [c for c in text_columns if features and c in features]
        numeric = [c for c in numeric if features[c] != Value("string")]
        same = len({tuple(t.column_names) for t in tables.values()}) == 1
        if builder == "csv" and numeric and same:
            features.update({c: Value("string") for c in numeric})
            tables = load_dataset(builder, data_files=files, features=features, **kwargs)
        return tables
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{owner}: data file not found ({err}); data_files={data_files!r} are read "
            "relative to the working directory."
        ) from err
    except DatasetGenerationError as err:  # says only "An error occurred while generating"
        cause = err.__cause__ or err
        fix = (
            "the files must be UTF-8: convert them (e.g. iconv -f latin1 -t utf-8)"
            if isinstance(cause, UnicodeDecodeError)
            else "fix the files, or data_format if it is not theirs"
        )
        raise ValueError(
            f"{owner}: cannot read data_files={data_files!r} as {fmt}: "
            f"{type(cause).__name__}: {cause}; {fix}."
        ) from err


def require_columns(owner: str, table: Dataset, **fields: str) -> None:
    """Raise if a configured field (``argument name=column``) is not a column of ``table``."""
    for argument, column in fields.items():
        if column not in table.column_names:
            raise ValueError(
                f"{owner}: {argument}={column!r} is not a column of the data; available "
                f"columns: {table.column_names}. Set {argument} to one of them."
            )


def train_val_split(
    owner: str, table: Dataset, val_fraction: float, seed: int
) -> tuple[Dataset, Dataset | None]:
    """Split off a validation set of ``val_fraction`` of the rows (deterministic in ``seed``)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"{owner}: val_fraction={val_fraction} must be in [0, 1).")
    if val_fraction == 0.0:
        return table, None
    n_val = max(1, round(val_fraction * len(table)))
    if n_val >= len(table):
        raise ValueError(
            f"{owner}: val_fraction={val_fraction} of {len(table)} rows leaves no training "
            "rows; use more data or a smaller val_fraction."
        )
    parts = table.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
