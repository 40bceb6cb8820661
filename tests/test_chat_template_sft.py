"""SFTDataModule(chat_template=...): rows rendered by the tokenizer's chat template, as TRL's
SFTTrainer renders prompt-completion conversations (offline: a byte tokenizer with ChatML)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_hf_modules import PAIRS, TINY, trainer, write_jsonl
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from lightning_selmerge.cli import main
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.hf import CausalLMModule, SFTDataModule
from lightning_selmerge.hf.loading import byte_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROOT = Path(__file__).resolve().parents[1]


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_prompt_is_masked_exactly_and_the_assistant_turn_is_the_target(
    tmp_path: Path,
) -> None:
    rows = [
        {"prompt": "Hi", "response": "Yo", "topic": "greet"},
        {"prompt": "Why?", "response": "Because it is so.", "topic": "ask"},
        {
            "prompt": "A prompt too long to leave room for any answer",
            "response": "x",
            "topic": "cut",
        },
    ]
    max_length = 60
    dm = SFTDataModule(
        data_files=write_jsonl(tmp_path / "pairs.jsonl", rows),
        prompt_template="[{topic}] {prompt}",
        chat_template=True,
        system_prompt="Be brief.",
        max_length=max_length,
        val_fraction=0.0,
    )
    tokenizer = dm.tokenizer = chatml_tokenizer()
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        dm.setup("fit")
    assert len(dm.train_set) == 2
    for row, example in zip(rows, dm.train_set):
        chat = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"[{row['topic']}] {row['prompt']}"},
        ]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
        turn = f"{row['response']}<|im_end|>\n"  # the template's end of turn; no EOS after it
        prompt_ids, turn_ids = ids(tokenizer, prompt), ids(tokenizer, turn)
        assert example["input_ids"] == (prompt_ids + turn_ids)[:max_length]
        assert example["labels"] == ([-100] * len(prompt_ids) + turn_ids)[:max_length]
        assert tokenizer.eos_token_id not in example["input_ids"]
    first, second = dm.train_set
    assert tokenizer.decode([i for i in first["labels"] if i != -100]) == "Yo<|im_end|>\n"
    assert len(second["input_ids"]) == max_length  # its answer is truncated, still labelled
    assert tokenizer.decode([i for i in second["labels"] if i != -100]).startswith("Because")


def test_a_template_string_is_set_on_the_tokenizer(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "response": "Yo"}])
    dm = SFTDataModule(data_files=pairs, chat_template=CHATML, val_fraction=0.0)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    assert dm.tokenizer.chat_template == CHATML
    # the default prompt_template adds no newline to the user's message
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    assert dm.tokenizer.decode(dm.train_set[0]["input_ids"]) == rendered


def test_chat_template_errors(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "response": "Yo"}])
    dm = SFTDataModule(data_files=pairs, chat_template=True, val_fraction=0.0)
    dm.tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match=r"has no chat template.*pass the template's text"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="is not a Jinja template"):
        SFTDataModule(data_files=pairs, chat_template="chatml")
    with pytest.raises(ValueError, match="system_prompt needs chat_template"):
        SFTDataModule(data_files=pairs, system_prompt="Be brief.")
    # the generation prompt (<bot>) is not how the template starts the assistant's turn
    odd = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    dm = SFTDataModule(data_files=pairs, chat_template=odd, val_fraction=0.0)
    dm.tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="not prefix-consistent(.|\n)*'<user>Hi<bot>'"):
        dm.setup("fit")


GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/"
    "assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set "
    "role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' "
    "+ role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if "
    "add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@pytest.mark.parametrize("messages", [False, True])
def test_a_template_refusing_a_system_message_is_named_with_the_fix(
    tmp_path: Path, messages: bool
) -> None:
    """Gemma's template raises a Jinja TemplateError on a system message: system_prompt is
    refused as a ValueError that says where the instruction goes instead."""
    rows = [{"prompt": "Hi", "response": "Yo", "m": [{"role": "user", "content": "Hi"}]}]
    dm = SFTDataModule(
        data_files=write_jsonl(tmp_path / "p.jsonl", rows),
        chat_template=GEMMA,
        system_prompt="Be brief.",
        messages_field="m" if messages else None,
        val_fraction=0.0,
    )
    dm.tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="refuses a system message .System role not supported"):
        dm.setup("fit")


def test_chat_sft_fits_and_exports_the_template(tmp_path: Path) -> None:
    """A tokenizer directory carrying its chat template, through the module and the ensemble."""
    chatml_tokenizer().save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY, tokenizer_name_or_path=str(tmp_path / "tok"))
    dm = SFTDataModule(
        data_files=str(PAIRS),
        chat_template=True,
        system_prompt="Be brief.",
        limit_samples=8,
        batch_size=4,
        max_length=96,
        val_fraction=0.25,
    )
    fit = trainer(
        tmp_path,
        max_epochs=1,
        strategy=DataOrderEnsemble(num_replicas=2, seed=0),
        callbacks=[SelectionMergeCallback(seed=0, save_dir=str(tmp_path / "merged"))],
    )
    fit.fit(module, dm)
    assert math.isfinite(float(fit.callback_metrics["val_loss"]))
    exported = AutoTokenizer.from_pretrained(tmp_path / "merged" / "epoch_000")
    assert exported.chat_template == CHATML
    # ChatML's <|im_end|> is not this tokenizer's EOS: the export stops generating at both
    generation = GenerationConfig.from_pretrained(tmp_path / "merged" / "epoch_000")
    end = exported.convert_tokens_to_ids("<|im_end|>")
    assert generation.eos_token_id == [exported.eos_token_id, end]


def test_a_yaml_config_sets_a_chat_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = tmp_path / "chat.yaml"
    overlay.write_text(
        "data:\n  init_args:\n    system_prompt: Be brief.\n    chat_template: |-\n"
        + "".join(f"      {line}\n" for line in CHATML.splitlines())
    )
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "sft_causal_lm.yaml"),
        "--config",
        str(overlay),
    ]
    args += [f"--data.init_args.data_files={PAIRS}", "--data.init_args.max_length=128"]
    args += ["--trainer.fast_dev_run=1", "--trainer.logger=false", "--trainer.accelerator=cpu"]
    assert main(args) == 0
    # the template reached the module's tokenizer, so the merged model's export carries it
    merged = tmp_path / "runs" / "sft" / "merged" / "epoch_000"
    assert AutoTokenizer.from_pretrained(merged).chat_template == CHATML


def _bert_like_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer, ``[CLS] text [SEP]``, whose [SEP] a causal LM takes as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from lightning_selmerge.hf.loading import ensure_sequence_tokens

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hi", "yo", "q", ":", "(", ")", "greet"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    ensure_sequence_tokens("test", tokenizer)
    return tokenizer


@pytest.mark.parametrize("kind", ["byte", "bert", "chat"])
def test_encode_prompt_gives_what_training_put_before_the_response(kind: str) -> None:
    """encode_prompt (what to generate from) is the masked head of the training row, for the
    same settings: with a BERT-style tokenizer it ends without [SEP] (its EOS), which
    tokenizer(prompt) would append."""
    from lightning_selmerge.hf import encode_prompt
    from lightning_selmerge.hf.preprocess import chat_sft_features, sft_features

    tokenizer = {
        "byte": byte_tokenizer,
        "bert": _bert_like_tokenizer,
        "chat": chatml_tokenizer,
    }[kind]()
    template = "q : {prompt} ( {topic} )"
    rows = {"prompt": ["hi"], "response": ["yo"], "topic": ["greet"]}
    if kind == "chat":
        features = chat_sft_features(rows, tokenizer, "prompt", "response", template, 64, "sys")
        head = encode_prompt(tokenizer, "hi", template, True, "sys", topic="greet")
    else:
        features = sft_features(rows, tokenizer, "prompt", "response", template, 64)
        head = encode_prompt(tokenizer, "hi", template, topic="greet")
    labels = features["labels"][0]
    masked = next(i for i, label in enumerate(labels) if label != -100)
    assert head == features["input_ids"][0][:masked]
    if kind == "bert":
        assert head[0] == tokenizer.cls_token_id and tokenizer.eos_token_id not in head
        assert tokenizer("q : hi ( greet )")["input_ids"] == [*head, tokenizer.eos_token_id]


def _sentencepiece_like_tokenizer(split_lines: bool) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: ``<s>`` before a text, words marked by ``▁`` (Metaspace,
    prepended to the first word only), trained on the shipped pairs; ``split_lines`` keeps
    newlines tokens of their own (as Llama's byte-fallback ``<0x0A>``), else BPE merges
    across them."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), metaspace])
        if split_lines
        else metaspace
    )
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(
        [f"{row['prompt']}\n{row['response']}" for row in rows],
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("split_lines", [True, False])
def test_a_response_is_tokenised_as_it_follows_its_prompt(split_lines: bool) -> None:
    """SentencePiece-style tokenizers mark a text's first word with ``▁``: a response
    tokenised alone would train a space the prompt + response text does not have. It is
    tokenised after its prompt; where a token spans the seam, alone (the prompt's ids stay
    those encode_prompt gives, and exactly they are masked)."""
    from lightning_selmerge.hf import encode_prompt
    from lightning_selmerge.hf.preprocess import sft_features

    tokenizer = _sentencepiece_like_tokenizer(split_lines)
    rows = {"prompt": ["What is AI?"], "response": ["It is a field."]}
    features = sft_features(rows, tokenizer, "prompt", "response", "{prompt}\n", 64)
    (ids,), (labels,) = features["input_ids"], features["labels"]
    head = encode_prompt(tokenizer, "What is AI?")
    assert ids[: len(head)] == head and labels[: len(head)] == [-100] * len(head)
    assert all(label != -100 for label in labels[len(head) :])
    joined = tokenizer("What is AI?\nIt is a field.", add_special_tokens=False)["input_ids"]
    if split_lines:  # the row is the joined text's tokens, decoded without a stray space
        assert ids == [tokenizer.bos_token_id, *joined, tokenizer.eos_token_id]
        assert tokenizer.decode(ids) == "<s> What is AI?\nIt is a field.</s>"
    else:  # "?\nI" is one token of the joined text: the response goes alone
        alone = tokenizer("It is a field.", add_special_tokens=False)["input_ids"]
        assert ids[len(head) :] == [*alone, tokenizer.eos_token_id]


LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_tokenizer(eos_token: str = "<|end_of_text|>") -> PreTrainedTokenizerFast:
    """Byte-level, with Llama-3's special tokens and chat template; the instruct checkpoints'
    EOS is ``<|eot_id|>``, the base ones' ``<|end_of_text|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lightning_selmerge.hf.loading import bytes_to_unicode

    backend = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    backend.add_special_tokens([*names, "<|eot_id|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=names[0], eos_token=eos_token, pad_token=names[1]
    )
    tokenizer.chat_template = LLAMA3
    return tokenizer


def test_the_end_of_turn_is_found_among_added_special_tokens() -> None:
    """Llama-3's <|eot_id|> is an added token marked special, not one of the tokenizer's named
    or extra special tokens (all_special_ids leaves it out): it is still the end of turn."""
    from lightning_selmerge.hf.preprocess import end_of_turn_id

    tokenizer = llama3_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot not in tokenizer.all_special_ids
    assert end_of_turn_id(tokenizer) == eot


def test_generation_stops_at_the_end_of_turn_when_set_up_before_the_fit(tmp_path: Path) -> None:
    """setup() before the fit (as the class docstring does) tokenises once; the fit's setup
    still gives the module's generation config the end of turn."""
    chatml_tokenizer().save_pretrained(tmp_path / "tok")
    module = CausalLMModule(config=TINY, tokenizer_name_or_path=str(tmp_path / "tok"))
    dm = SFTDataModule(data_files=str(PAIRS), chat_template=True, limit_samples=4, val_fraction=0.0)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    assert module.model.generation_config.eos_token_id == module.tokenizer.eos_token_id
    trainer(tmp_path, max_epochs=1).fit(module, dm)
    end = module.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert module.model.generation_config.eos_token_id == [module.tokenizer.eos_token_id, end]


def test_generation_stops_at_an_end_of_turn_that_is_the_tokenizers_eos(tmp_path: Path) -> None:
    """A base checkpoint (generation stops at <|end_of_text|>) fine-tuned with the instruct
    tokenizer, whose EOS is the end of turn <|eot_id|>: every answer ends with <|eot_id|>, so
    generation must stop there too, though it is the tokenizer's EOS."""
    llama3_tokenizer().save_pretrained(tmp_path / "base")
    CausalLMModule(
        config=TINY, tokenizer_name_or_path=str(tmp_path / "base")
    ).model.save_pretrained(tmp_path / "base")
    llama3_tokenizer(eos_token="<|eot_id|>").save_pretrained(tmp_path / "instruct")
    module = CausalLMModule(
        model_name_or_path=str(tmp_path / "base"), tokenizer_name_or_path=str(tmp_path / "instruct")
    )
    end_of_text = module.tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    eot = module.tokenizer.eos_token_id
    assert module.model.generation_config.eos_token_id == end_of_text
    dm = SFTDataModule(data_files=str(PAIRS), chat_template=True, limit_samples=4, val_fraction=0.0)
    trainer(tmp_path, max_epochs=1).fit(module, dm)
    assert all([i for i in row["labels"] if i != -100][-1] == eot for row in dm.train_set)
    assert module.model.generation_config.eos_token_id == [end_of_text, eot]


def test_encode_prompt_renders_with_a_given_template() -> None:
    from lightning_selmerge.hf import encode_prompt

    tokenizer = chatml_tokenizer()
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    head = encode_prompt(tokenizer, "Hi", chat_template=other)
    assert tokenizer.decode(head) == "[user] Hi\n[assistant] "
    assert tokenizer.chat_template == CHATML  # the tokenizer's own is left as it was
