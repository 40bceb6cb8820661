"""The datasets cache of a tokenised data file follows the package's tokenisation code."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from test_hf_modules import ready, write_jsonl

from lightning_selmerge.hf import SFTDataModule, cache_key, preprocess

ROWS = [{"prompt": "Hi", "response": "Yo"}, {"prompt": "Why?", "response": "Because."}]


def test_an_upgrade_that_changes_the_tokenisation_is_not_hidden_by_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # load_dataset caches the file and every map of it; datasets keys a map by the function's
    # name, so code changed behind the same name (an upgrade) would be read from the cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    files = write_jsonl(tmp_path / "pairs.jsonl", ROWS)

    def tokenised() -> list[list[int]]:
        data = SFTDataModule(data_files=files, val_fraction=0.0, max_length=32)
        return ready(data).train_set["input_ids"]

    before = tokenised()
    assert tokenised() == before  # the same code: the same rows (read from the cache)
    monkeypatch.setattr(preprocess, "added_prefix", lambda tokenizer: [2])  # "new code"
    monkeypatch.setattr(cache_key, "hf_code_digest", lambda: "a newer version's sources")
    assert tokenised() == [[2, *ids] for ids in before]
