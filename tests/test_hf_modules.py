"""Hugging Face LightningModules and DataModules (tiny GPT-2s from configs, offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: every source is local

import csv
import doctest
import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging

from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.hf import (
    CausalLMModule,
    ClassificationDataModule,
    SequenceClassificationModule,
    SFTDataModule,
)
from lightning_selmerge.hf.loading import byte_tokenizer

datasets.disable_progress_bars()
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

PAIRS = Path(__file__).resolve().parents[1] / "examples" / "data" / "chatterbot_pairs.jsonl"
TINY = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 128}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def ready(dm: SFTDataModule | ClassificationDataModule) -> Any:
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    return dm


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]  # ByT5: ids 0-2 are <pad>, </s>, <unk>


def trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_docstring_examples_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_selmerge.hf as hf

    monkeypatch.chdir(PAIRS.parents[2])  # the examples use repository-relative paths
    names = ("sft_data", "classification_data", "export", "files", "loading", "modules")
    for name in (*names, "optim", "preprocess"):
        module = importlib.import_module(f"lightning_selmerge.hf.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, (name, result)
    assert sorted(hf.__all__) == sorted(
        [
            "CausalLMModule",
            "ClassificationDataModule",
            "SFTDataModule",
            "SequenceClassificationModule",
            "encode_prompt",
            "save_pretrained",
        ]
    )


# -- data -----------------------------------------------------------------------------------


def test_sft_labels_mask_prompt_and_padding_exactly(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hi", "response": "Yo", "topic": "greet"},
        {"prompt": "Why?", "response": "Because.", "topic": "ask"},
        {"prompt": "A long prompt that fills everything", "response": "x", "topic": "cut"},
    ]
    dm = SFTDataModule(
        data_files=write_jsonl(tmp_path / "pairs.jsonl", rows),
        prompt_template="[{topic}] {prompt}:",
        max_length=16,
        val_fraction=0.0,
    )
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        ready(dm)
    assert len(dm.train_set) == 2  # the third row's prompt alone exceeds max_length
    batch = dm.collate_fn([{**dm.train_set[i], "sample_index": i} for i in range(2)])

    first_prompt, first = byte_ids("[greet] Hi:"), [*byte_ids("Yo"), 1]  # 1 = </s>
    second_prompt = byte_ids("[ask] Why?:")
    second = [*byte_ids("Because."), 1][: 16 - len(second_prompt)]  # truncated response
    pad = 16 - len(first_prompt) - len(first)
    assert pad == 2 and len(second) == 5
    assert batch["input_ids"].tolist() == [
        first_prompt + first + [0] * pad,
        second_prompt + second,
    ]
    assert batch["labels"].tolist() == [
        [-100] * len(first_prompt) + first + [-100] * pad,
        [-100] * len(second_prompt) + second,
    ]
    assert batch["attention_mask"].tolist() == [[1] * 14 + [0] * pad, [1] * 16]
    assert batch["sample_index"].tolist() == [0, 1]


def test_validation_split_is_deterministic_and_disjoint() -> None:
    def split(seed: int) -> tuple[list[list[int]], list[list[int]]]:
        dm = ready(SFTDataModule(data_files=str(PAIRS), limit_samples=30, split_seed=seed))
        return dm.train_set["input_ids"], dm.val_set["input_ids"]

    train, val = split(0)
    assert (len(train), len(val)) == (27, 3)
    assert not {tuple(ids) for ids in train} & {tuple(ids) for ids in val}
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_string_labels_map_to_sorted_ids_or_label_names(tmp_path: Path) -> None:
    rows = [{"text": t, "label": y} for t, y in [("good", "pos"), ("bad", "neg"), ("meh", "neu")]]
    files = write_tsv(tmp_path / "train.tsv", rows)

    dm = ready(ClassificationDataModule(data_files=files, val_fraction=0.0))
    assert dm.label_names == ["neg", "neu", "pos"]
    assert dm.train_set["labels"] == [2, 0, 1]
    assert dm.num_labels == 3

    dm = ready(
        ClassificationDataModule(
            data_files=files, val_fraction=0.0, label_names=["pos", "neg", "neu"]
        )
    )
    assert dm.train_set["labels"] == [0, 1, 2]
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "sample_index"]
    order = batch["sample_index"].tolist()
    assert batch["labels"].tolist() == order  # row i has label id i

    with pytest.raises(ValueError, match=r"labels \['neu'\] are not in label_names"):
        ready(ClassificationDataModule(data_files=files, label_names=["pos", "neg"]))


def test_rows_missing_a_value_are_dropped_not_trained_as_none(tmp_path: Path) -> None:
    """An empty CSV cell or a JSON null came through as None and trained as the text "None"
    (SFT), or raised an opaque tokenizer TypeError (classification)."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,response\nHello,\n,orphan\nHi,Yo\n", encoding="utf-8")
    dm = SFTDataModule(data_files=str(pairs), val_fraction=0.0, max_length=32)
    with pytest.warns(UserWarning, match=r"dropped 2 of 3 rows missing a value"):
        ready(dm)
    assert len(dm.train_set) == 1
    assert dm.train_set["input_ids"][0] == [*byte_ids("Hi"), 13, *byte_ids("Yo"), 1]
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\ngood,pos\n,neg\nbad,neg\n", encoding="utf-8")
    dm = ClassificationDataModule(data_files=str(texts), val_fraction=0.0)
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 rows missing a value"):
        ready(dm)
    assert dm.train_set["labels"] == [1, 0]


def test_whole_float_labels_are_class_ids(tmp_path: Path) -> None:
    """An int label column with an empty cell reads as floats (pandas); once the row missing
    its label was dropped, the rest were refused as "the label column holds ['float']"."""
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\ngood,1\nbad,0\nmeh,\nfine,2\n", encoding="utf-8")
    dm = ClassificationDataModule(data_files=str(texts), val_fraction=0.0)
    with pytest.warns(UserWarning, match=r"dropped 1 of 4 rows missing a value"):
        ready(dm)
    assert dm.train_set["labels"] == [1, 0, 2]
    assert (dm.num_labels, dm.label_names) == (3, None)
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": 1.0}]
    with pytest.raises(ValueError, match=r"holds \['float'\]"):
        ready(ClassificationDataModule(data_files=write_jsonl(tmp_path / "f.jsonl", rows)))


def test_a_classifier_checkpoint_keeps_its_class_ids(tmp_path: Path) -> None:
    """Training on from a classifier whose config names its classes: the data's string labels
    take the checkpoint's ids (sorted names would swap pos and neg without a word), and labels
    the checkpoint does not name fall back to the sorted order with a warning."""
    source = SequenceClassificationModule(config=TINY, num_labels=3)
    source.model.config.id2label = {0: "pos", 1: "neutral", 2: "neg"}
    source.model.config.label2id = {"pos": 0, "neutral": 1, "neg": 2}
    source.model.save_pretrained(tmp_path / "clf")
    source.tokenizer.save_pretrained(tmp_path / "clf")
    rows = [{"text": t, "label": y} for t, y in [("good", "pos"), ("bad", "neg"), ("meh", "pos")]]
    files = write_tsv(tmp_path / "train.tsv", rows)
    module = SequenceClassificationModule(model_name_or_path=str(tmp_path / "clf"), num_labels=3)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=1)
    trainer.strategy.connect(module)
    trainer.lightning_module.trainer = trainer
    dm = ClassificationDataModule(data_files=files, val_fraction=0.0)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.label_names == ["pos", "neutral", "neg"]
    assert dm.train_set["labels"] == [0, 2, 0]
    assert module.model.config.id2label == {0: "pos", 1: "neutral", 2: "neg"}
    other = write_tsv(tmp_path / "other.tsv", [{"text": "x", "label": "spam"}])
    dm = ClassificationDataModule(data_files=other, val_fraction=0.0)
    dm.trainer = trainer
    with pytest.warns(UserWarning, match=r"do not name the data's labels \['spam'\]"):
        dm.setup("fit")
    assert dm.label_names == ["spam"]
    assert module.model.config.id2label == {0: "spam", 1: "neutral", 2: "neg"}
    other = write_tsv(tmp_path / "more.tsv", [{"text": "x", "label": y} for y in ("neg", "new")])
    dm = ClassificationDataModule(data_files=other, val_fraction=0.0)
    dm.trainer = trainer
    with pytest.warns(UserWarning, match="do not name"):
        dm.setup("fit")
    config = module.model.config  # one name per id, label2id its inverse
    assert config.id2label == {0: "neg", 1: "new", 2: "LABEL_2"}
    assert config.label2id == {"neg": 0, "new": 1, "LABEL_2": 2}


def test_a_classifier_checkpoint_for_other_classes_is_refused_or_gets_a_new_head(
    tmp_path: Path,
) -> None:
    """A 3-class checkpoint asked for 2 classes: refused with both fixes (transformers raises a
    bare RuntimeError); ignore_mismatched_sizes=True starts a new head and keeps the rest."""
    source = SequenceClassificationModule(config=TINY, num_labels=3)
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"saved with num_labels=3, the module asks for num_labels=2\); set num_labels=3 .*"
        r"or pass ignore_mismatched_sizes=True",
    ):
        SequenceClassificationModule(model_name_or_path=str(tmp_path), num_labels=2)
    module = SequenceClassificationModule(
        model_name_or_path=str(tmp_path), num_labels=2, ignore_mismatched_sizes=True
    )
    assert module.model.score.weight.shape[0] == 2
    body = source.model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(module.model.transformer.h[0].attn.c_attn.weight, body)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True applies to a checkpoint"):
        SequenceClassificationModule(config=TINY, num_labels=2, ignore_mismatched_sizes=True)


def test_bad_data_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"extension '\.txt'.*pass data_format"):
        SFTDataModule(data_files=str(tmp_path / "pairs.txt"))
    with pytest.raises(ValueError, match="mix formats"):
        SFTDataModule(data_files=["a.json", "b.csv"])
    with pytest.raises(
        ValueError, match=r"prompt_field='question' is not a column.*\['prompt', 'response'"
    ):
        ready(SFTDataModule(data_files=str(PAIRS), prompt_field="question", limit_samples=4))
    files = write_tsv(tmp_path / "t.tsv", [{"text": "a", "category": "x"}])
    with pytest.raises(ValueError, match=r"label_field='label'.*\['text', 'category'\]"):
        ready(ClassificationDataModule(data_files=files))
    with pytest.raises(ValueError, match=r"prompt_template uses \['topic'\]"):
        ready(SFTDataModule(data_files=str(PAIRS), prompt_template="{topic}", limit_samples=4))
    with pytest.raises(ValueError, match="has no tokenizer"):
        SFTDataModule(data_files=str(PAIRS)).setup("fit")


def test_data_files_splits_other_than_train_and_validation_are_refused(tmp_path: Path) -> None:
    """A {"train": ..., "test": ...} (or "val") dict read only "train": the other file was
    ignored and validation silently came from val_fraction of the training rows."""
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    val = write_jsonl(tmp_path / "v.jsonl", rows[:3])
    for name in ("test", "val"):
        with pytest.raises(ValueError, match=rf"splits \['{name}'\], which would be ignored"):
            SFTDataModule(data_files={"train": train, name: val})
    with pytest.raises(ValueError, match=r"val_data_files has splits \['test'\]"):
        SFTDataModule(data_files=train, val_data_files={"test": val})
    dm = ready(SFTDataModule(data_files={"train": train, "validation": val}))
    assert (len(dm.train_set), len(dm.val_set)) == (10, 3)


def test_csv_text_columns_of_numbers_are_read_as_written(tmp_path: Path) -> None:
    """pandas read a CSV column of numbers as numbers: SFT trained "02139" as "2139.0" and
    "1e3" as "1000.0"; a classification text column of numbers crashed the tokenizer."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,response\nHalf?,0.50\nZip?,02139\nk?,1e3\n", encoding="utf-8")
    dm = ready(SFTDataModule(data_files=str(pairs), val_fraction=0.0, max_length=32))
    targets = [[i for i in ids if i != -100] for ids in dm.train_set["labels"]]
    assert targets == [[*byte_ids(r), 1] for r in ("0.50", "02139", "1e3")]
    texts = tmp_path / "texts.tsv"
    texts.write_text("text\tlabel\n007\t1\n42\t0\n", encoding="utf-8")
    dm = ready(ClassificationDataModule(data_files=str(texts), val_fraction=0.0))
    assert dm.train_set["input_ids"] == [byte_ids("007"), byte_ids("42")]
    assert dm.train_set["labels"] == [1, 0]


def test_csv_answers_such_as_none_or_na_are_text_and_empty_cells_are_missing(
    tmp_path: Path,
) -> None:
    """pandas' default NA strings dropped rows answering N/A, None, NA or null as missing."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,response\nA?,N/A\nB?,None\nC?,null\nD?,NA\nE?,\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 1 of 5 rows missing a value"):
        dm = ready(SFTDataModule(data_files=str(pairs), val_fraction=0.0, max_length=32))
    targets = [[i for i in ids if i != -100] for ids in dm.train_set["labels"]]
    assert targets == [[*byte_ids(r), 1] for r in ("N/A", "None", "null", "NA")]


def test_a_file_that_is_not_utf8_is_named_with_the_fix(tmp_path: Path) -> None:
    """A Latin-1 CSV raised datasets' DatasetGenerationError "An error occurred while
    generating the dataset", naming neither the file nor the encoding."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(b"prompt,response\nhi,caf\xe9\nq,r\n")
    with pytest.raises(ValueError, match=r"cannot read data_files=.*pairs\.csv.*must be UTF-8"):
        ready(SFTDataModule(data_files=str(pairs), val_fraction=0.0))


def test_batches_are_right_padded_whatever_the_tokenizer_padding_side(tmp_path: Path) -> None:
    # without position_ids, left padding shifts GPT-2's positions: a loss would depend on the batch
    rows = [
        {"prompt": "Hi", "response": "Yo", "text": "ok", "label": "a"},
        {
            "prompt": "A much longer prompt",
            "response": "and a long answer",
            "text": "a long text",
            "label": "b",
        },
    ]
    files = write_jsonl(tmp_path / "rows.jsonl", rows)
    for dm in (
        SFTDataModule(data_files=files, val_fraction=0.0),
        ClassificationDataModule(data_files=files, val_fraction=0.0),
    ):
        dm.tokenizer = byte_tokenizer()
        dm.tokenizer.padding_side = "left"
        dm.setup("fit")
        assert dm.tokenizer.padding_side == "left"  # the user's tokenizer is left alone
        items = [{**dm.train_set[i], "sample_index": i} for i in range(2)]
        batch = dm.collate_fn(items)
        short = min(range(2), key=lambda i: len(items[i]["input_ids"]))
        n, width = len(items[short]["input_ids"]), batch["input_ids"].shape[1]
        assert n < width
        assert batch["input_ids"][short].tolist() == items[short]["input_ids"] + [0] * (width - n)
        assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
        if isinstance(dm, SFTDataModule):
            labels = items[short]["labels"] + [-100] * (width - n)
            assert batch["labels"][short].tolist() == labels
            torch.manual_seed(0)
            lm = CausalLMModule(config=TINY).eval()
            with torch.no_grad():
                torch.testing.assert_close(
                    lm.per_sample_loss(batch)[short],
                    lm.per_sample_loss(dm.collate_fn([items[short]]))[0],
                )


# -- modules --------------------------------------------------------------------------------


def test_model_source_must_be_exactly_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got neither of model_name_or_path and config"):
        CausalLMModule()
    with pytest.raises(ValueError, match="got both"):
        SequenceClassificationModule(model_name_or_path=str(tmp_path), config=TINY)
    with pytest.raises(ValueError, match="needs a 'model_type' key"):
        CausalLMModule(config={"n_layer": 1})
    with pytest.raises(
        ValueError, match=r"cannot load a tokenizer from .*missing.*no such local directory"
    ):
        CausalLMModule(model_name_or_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="torch_dtype='float8'"):
        CausalLMModule(config=TINY, torch_dtype="float8")


def test_a_checkpoints_pad_id_follows_the_tokenizer(tmp_path: Path) -> None:
    """A checkpoint whose config names another pad id than the tokenizer pads with (Llama
    configs say pad 0, their tokenizers have none and pad with EOS here): a classifier pools on
    the config's pad id, so a text's logits depended on its batch-mates."""
    source = SequenceClassificationModule(config=TINY, num_labels=2)
    source.model.config.pad_token_id = 5  # not the tokenizer's pad (0)
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    module = SequenceClassificationModule(model_name_or_path=str(tmp_path), num_labels=2).eval()
    assert module.model.config.pad_token_id == module.tokenizer.pad_token_id == 0
    short = module.tokenizer(["hey"], return_tensors="pt")
    padded = module.tokenizer(["hey", "a longer text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(module(short).logits[0], module(padded).logits[0])


def test_from_config_model_matches_byte_tokenizer() -> None:
    module = SequenceClassificationModule(config=TINY, num_labels=3)
    config = module.model.config
    assert config.vocab_size == len(module.tokenizer) == 259
    assert (config.pad_token_id, config.eos_token_id, config.num_labels) == (0, 1, 3)
    # pooling uses the last non-pad token: padding must not change a text's logits
    module.eval()
    short = module.tokenizer(["hey"], return_tensors="pt")
    padded = module.tokenizer(["hey", "a longer text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(module(short).logits[0], module(padded).logits[0])


def test_from_pretrained_directory_round_trip(tmp_path: Path) -> None:
    source = CausalLMModule(config=TINY)
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    loaded = CausalLMModule(model_name_or_path=str(tmp_path), torch_dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    assert len(loaded.tokenizer) == len(source.tokenizer)
    weight = source.model.transformer.wte.weight
    assert torch.equal(loaded.model.transformer.wte.weight, weight.to(torch.bfloat16))


def test_default_dtype_is_float32_even_for_a_low_precision_checkpoint(tmp_path: Path) -> None:
    source = CausalLMModule(config=TINY)
    source.model.to(torch.bfloat16).save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    assert CausalLMModule(config=TINY).model.dtype == torch.float32
    assert CausalLMModule(model_name_or_path=str(tmp_path)).model.dtype == torch.float32
    auto = CausalLMModule(model_name_or_path=str(tmp_path), torch_dtype="auto")
    assert auto.model.dtype == torch.bfloat16  # only "auto" keeps the checkpoint's dtype


BERT = {
    "model_type": "bert",
    "num_hidden_layers": 1,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


def _sees_the_future(model: Any) -> bool:
    """Whether changing the last token changes the logits at earlier positions."""
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    other = ids.clone()
    other[0, -1] = 100
    with torch.no_grad():
        return not torch.allclose(
            model(input_ids=ids).logits[0, :-1], model(input_ids=other).logits[0, :-1]
        )


def test_causal_lm_makes_an_encoder_causal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    torch.manual_seed(0)
    clf = SequenceClassificationModule(config=BERT).eval()
    assert not clf.model.config.is_decoder and _sees_the_future(clf.model)  # the probe works
    clf.model.save_pretrained(tmp_path)  # an encoder checkpoint (is_decoder=False on disk)
    clf.tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        from_config = CausalLMModule(config=BERT).eval()
        from_checkpoint = CausalLMModule(model_name_or_path=str(tmp_path)).eval()
    for lm in (from_config, from_checkpoint):
        assert lm.model.config.is_decoder and not _sees_the_future(lm.model)
    assert caplog.text.count("setting is_decoder=True") == 2


def test_an_encoders_tokenizer_ends_responses_with_its_separator(tmp_path: Path) -> None:
    """A BERT checkpoint fine-tuned as a causal LM: its tokenizer has [CLS] and [SEP] but no
    BOS or EOS; [SEP] becomes EOS (responses end with it, the config's eos_token_id is it) and
    [CLS] BOS, as in Hugging Face's encoder-decoder recipe."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast

    from lightning_selmerge.hf.preprocess import sft_features

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hi", "there", "yo"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokens = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]"}
    tokenizer = BertTokenizerFast(tokenizer_object=backend, sep_token="[SEP]", **tokens)
    assert tokenizer.eos_token is None and tokenizer.bos_token is None
    encoder = SequenceClassificationModule(config=BERT).model
    encoder.config.bos_token_id = encoder.config.eos_token_id = None  # as BERT checkpoints
    encoder.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = CausalLMModule(model_name_or_path=str(tmp_path))
    assert (module.tokenizer.eos_token, module.tokenizer.bos_token) == ("[SEP]", "[CLS]")
    assert module.model.config.eos_token_id == 3 and module.model.config.bos_token_id == 2
    generation = module.model.generation_config  # built before: generation must stop at [SEP]
    assert (generation.eos_token_id, generation.bos_token_id) == (3, 2)
    rows = {"prompt": ["hi there"], "response": ["yo"]}
    features = sft_features(rows, module.tokenizer, "prompt", "response", "{prompt}", 16)
    assert features["input_ids"] == [[2, 4, 5, 6, 3]]
    assert features["labels"] == [[-100, -100, -100, 6, 3]]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi there", "response": "yo"}])
    dm = SFTDataModule(  # the data module loading the tokenizer itself maps it alike
        data_files=pairs, tokenizer_name_or_path=str(tmp_path), val_fraction=0.0
    )
    dm.setup("fit")
    assert dm.train_set["input_ids"] == [[2, 4, 5, 6, 3]]


@pytest.mark.parametrize("module_class", [SequenceClassificationModule, CausalLMModule])
def test_a_pretrained_checkpoint_trains_in_train_mode_with_its_own_dropout(
    tmp_path: Path, module_class: type
) -> None:
    """from_pretrained returns an eval-mode model; fine-tuning must see its dropout active."""
    source = SequenceClassificationModule(config={**BERT, "hidden_dropout_prob": 0.25})
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    module = module_class(model_name_or_path=str(tmp_path))
    dropouts = [m for m in module.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and module.model.training
    assert all(m.training for m in module.model.modules())
    assert {m.p for m in dropouts} >= {0.25}  # the checkpoint's own rate, not a default


def test_per_sample_loss_equals_model_loss_for_one_unpadded_sequence() -> None:
    torch.manual_seed(0)
    lm = CausalLMModule(config=TINY).eval()
    batch = dict(lm.tokenizer(["What is AI?"], return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    batch["sample_index"] = torch.tensor([5])  # must not reach the model
    with torch.no_grad():
        expected = lm.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        torch.testing.assert_close(lm.per_sample_loss(batch), expected.reshape(1))

    clf = SequenceClassificationModule(config=TINY, num_labels=3).eval()
    batch = dict(clf.tokenizer(["Hello there"], return_tensors="pt"), labels=torch.tensor([2]))
    with torch.no_grad():
        expected = clf.model(**batch).loss
        torch.testing.assert_close(clf.per_sample_loss(batch), expected.reshape(1))


def test_optimizer_skips_decay_on_vectors_and_warms_up() -> None:
    module = CausalLMModule(config=TINY, learning_rate=1e-3, weight_decay=0.1, warmup_steps=4)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(
        p.ndim == 1 for p in no_decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert isinstance(CausalLMModule(config=TINY).configure_optimizers(), torch.optim.AdamW)
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        CausalLMModule(config=TINY, lr_schedule="step")


class _Record(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[list[int], list[list[int]], tuple[int, ...]]] = []

    def on_train_batch_end(
        self, trainer: Trainer, module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        ids = [row[row != 0].tolist() for row in batch["input_ids"]]  # 0 = <pad>
        self.batches.append(
            (batch["sample_index"].tolist(), ids, tuple(outputs["sample_loss"].shape))
        )


def test_sample_index_and_sample_loss_reach_training_step(tmp_path: Path) -> None:
    dm = SFTDataModule(data_files=str(PAIRS), limit_samples=8, batch_size=4, val_fraction=0.0)
    record = _Record()
    module = CausalLMModule(config=TINY)
    trainer(tmp_path, max_steps=2, callbacks=[record]).fit(module, dm)
    assert dm.tokenizer is module.tokenizer  # taken from the module in setup()
    seen = [i for indices, _, _ in record.batches for i in indices]
    assert sorted(seen) == list(range(8))
    for indices, ids, shape in record.batches:
        assert shape == (len(indices),)
        assert ids == [dm.train_set[i]["input_ids"] for i in indices]


def test_num_labels_mismatch_with_module_is_caught(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": name} for i, name in enumerate("abcab")]
    dm = ClassificationDataModule(data_files=write_tsv(tmp_path / "t.tsv", rows))
    module = SequenceClassificationModule(config=TINY, num_labels=2)
    with pytest.raises(ValueError, match=r"3 classes \['a', 'b', 'c'\].*num_labels=3"):
        trainer(tmp_path, max_steps=1).fit(module, dm)


# -- ensemble fit + export ------------------------------------------------------------------


def _fit_and_check_export(
    tmp_path: Path, module: LightningModule, dm: Any, auto_class: Any
) -> Trainer:
    fit = trainer(
        tmp_path,
        max_epochs=1,
        strategy=DataOrderEnsemble(num_replicas=2, seed=0),
        callbacks=[SelectionMergeCallback(seed=0, save_dir=str(tmp_path / "merged"))],
    )
    fit.fit(module, dm)
    export = tmp_path / "merged" / "epoch_000"
    loaded = auto_class.from_pretrained(export, local_files_only=True).eval()
    assert len(AutoTokenizer.from_pretrained(export, local_files_only=True)) == len(
        module.tokenizer
    )
    batch = next(iter(dm.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, module.model(**inputs).logits)
    replica = fit.strategy.replica_states()[0]
    assert not torch.equal(
        replica["model.transformer.h.0.mlp.c_fc.weight"],
        module.model.transformer.h[0].mlp.c_fc.weight,
    )  # module holds the merge
    return fit


def test_causal_lm_ensemble_fit_exports_the_merge(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY, learning_rate=1e-3, warmup_steps=1, lr_schedule="linear")
    dm = SFTDataModule(data_files=str(PAIRS), limit_samples=16, batch_size=4, max_length=48)
    fit = _fit_and_check_export(tmp_path, module, dm, AutoModelForCausalLM)
    assert torch.isfinite(fit.callback_metrics["val_loss"])
    assert "replica_1/val_loss" in fit.callback_metrics
    # the linear decay spans one replica's steps (not the trainer's total): each ends at lr 0
    steps = math.ceil(len(dm.train_set) / 4)
    assert fit.global_step == 2 * steps
    for k in range(2):
        (sched,) = fit.strategy.replica_state(k).lr_schedulers
        assert sched["last_epoch"] == steps and sched["_last_lr"][0] == 0.0


def test_sequence_classification_ensemble_fit_exports_the_merge(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rows = [
        {"text": f"utterance {i}", "category": ["ai", "food", "sports"][i % 3]} for i in range(20)
    ]
    dm = ClassificationDataModule(
        data_files=write_tsv(tmp_path / "topics.tsv", rows),
        label_field="category",
        batch_size=4,
        val_fraction=0.2,
    )
    module = SequenceClassificationModule(config=TINY, num_labels=3, learning_rate=1e-3)
    fit = _fit_and_check_export(tmp_path, module, dm, AutoModelForSequenceClassification)
    assert 0.0 <= float(fit.callback_metrics["val_acc"]) <= 1.0
    exported = AutoConfig.from_pretrained(tmp_path / "merged" / "epoch_000")
    assert exported.id2label == {0: "ai", 1: "food", 2: "sports"}  # not LABEL_0..2
    assert exported.label2id == {"ai": 0, "food": 1, "sports": 2}
    fit.save_checkpoint(tmp_path / "fit.ckpt")  # the names come back with the module too
    loaded = SequenceClassificationModule.load_from_checkpoint(tmp_path / "fit.ckpt")
    assert loaded.model.config.id2label == {0: "ai", 1: "food", 2: "sports"}
    assert "replica_0/val_acc" in fit.callback_metrics


def test_sft_rows_start_as_the_tokenizer_starts_a_prompt() -> None:
    """OPT-style tokenizers prepend their BOS, which is also EOS: a training row starts with it,
    as tokenizer(prompt) does at inference (it was left out since BOS == EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from lightning_selmerge.hf.preprocess import added_prefix, sft_features

    words = ["<pad>", "</s>", "hi", "yo"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>"
    )
    assert tokenizer("hi")["input_ids"] == [1, 2]
    assert added_prefix(tokenizer) == [1]
    features = sft_features({"p": ["hi"], "r": ["yo"]}, tokenizer, "p", "r", "{prompt}", 8)
    assert features["input_ids"] == [[1, 2, 3, 1]]
    assert features["labels"] == [[-100, -100, 3, 1]]
