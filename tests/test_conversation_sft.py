"""SFTDataModule(messages_field=...): multi-turn conversations rendered by the chat template,
the loss on every assistant turn (offline: a byte tokenizer with ChatML)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_chat_template_sft import chatml_tokenizer
from test_hf_modules import TINY, trainer

from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.hf import CausalLMModule, SFTDataModule
from lightning_selmerge.hf.conversations import conversation_features
from lightning_selmerge.hf.preprocess import IGNORE_INDEX, chat_sft_features


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def labelled(tokenizer, ids: list[int], labels: list[int]) -> str:
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    return tokenizer.decode([token for token, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_a_one_turn_conversation_is_the_prompt_response_row() -> None:
    tokenizer = chatml_tokenizer()
    chat = [turn("user", "Hi"), turn("assistant", "Yo")]
    ours = conversation_features({"m": [chat]}, tokenizer, "m", 64, system_prompt="Be brief.")
    pair = chat_sft_features(
        {"p": ["Hi"], "r": ["Yo"]}, tokenizer, "p", "r", "{prompt}", 64, "Be brief."
    )
    assert ours == pair


def test_every_assistant_turn_is_labelled_and_nothing_else() -> None:
    tokenizer = chatml_tokenizer()
    chat = [
        turn("system", "Be brief."),
        turn("user", "Hi"),
        turn("assistant", "Yo"),
        turn("user", "Why?"),
        turn("assistant", "Because."),
    ]
    out = conversation_features({"m": [chat]}, tokenizer, "m", 256, system_prompt="ignored")
    (ids,), (labels,) = out["input_ids"], out["labels"]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.decode(ids) == text  # one system turn: the conversation had its own
    assert labelled(tokenizer, ids, labels) == "Yo<|im_end|>\nBecause.<|im_end|>\n"
    cut = conversation_features({"m": [chat]}, tokenizer, "m", 40)
    assert cut["input_ids"][0] == ids[:40] and cut["labels"][0] == labels[:40]


def test_no_token_spans_the_seam_between_a_prompt_and_its_answer() -> None:
    """A tokenizer that merges "\n\n" (as Qwen's and Llama-3's do) and answers starting with a
    newline: tokenised at once, the generation prompt's "\n" and the answer's make one token
    starting in the prompt, so the row's prompt is not the one generated from and the answer's
    first token goes unlabelled. Each answer is tokenised after its prompt, as a
    prompt/response row's is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lightning_selmerge.hf import encode_prompt
    from lightning_selmerge.hf.loading import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    newline = bytes_to_unicode()[ord("\n")]
    vocab[newline * 2] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(newline, newline)]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["</s>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    tokenizer.chat_template = chatml_tokenizer().chat_template
    chat = [turn("user", "Hi"), turn("assistant", "\nYo"), turn("user", "Ok?")]
    chat.append(turn("assistant", "\nSure"))
    out = conversation_features({"m": [chat]}, tokenizer, "m", 256)
    (ids,), (labels,) = out["input_ids"], out["labels"]
    assert labelled(tokenizer, ids, labels) == "\nYo<|im_end|>\n\nSure<|im_end|>\n"
    head = encode_prompt(tokenizer, "Hi", chat_template=True)
    assert ids[: len(head)] == head and labels[len(head)] != IGNORE_INDEX
    one_turn = conversation_features({"m": [chat[:2]]}, tokenizer, "m", 256)
    pair = chat_sft_features({"p": ["Hi"], "r": ["\nYo"]}, tokenizer, "p", "r", "{prompt}", 256)
    assert one_turn == pair


def test_conversation_errors(tmp_path: Path) -> None:
    data = tmp_path / "x.jsonl"
    data.write_text('{"m": []}\n')
    tokenizer = chatml_tokenizer()
    with pytest.raises(ValueError, match="m of row 0 is not a list of"):
        conversation_features({"m": ["Hi there"]}, tokenizer, "m", 64)
    tokenizer.chat_template = (  # drops the earlier assistant turns: not prefix-consistent
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] }}:{{ m['content'] }}|{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    chat = [turn("user", "a"), turn("assistant", "b"), turn("user", "c"), turn("assistant", "d")]
    with pytest.raises(ValueError, match="not prefix-consistent.*assistant turn 1"):
        conversation_features({"m": [chat]}, tokenizer, "m", 64)
    with pytest.raises(ValueError, match="messages_field='m' needs chat_template"):
        SFTDataModule(data_files=str(data), messages_field="m")
    with pytest.raises(ValueError, match="drop prompt_template"):
        SFTDataModule(
            data_files=str(data), messages_field="m", chat_template=True, prompt_template="{x}"
        )


def test_a_conversation_file_fits(tmp_path: Path) -> None:
    """A jsonl ``messages`` column (one message with an extra key, which datasets fills with
    None in the others), a row without an assistant turn dropped, through an ensemble fit."""
    chats = [
        [
            turn("user", f"Question {i}?"),
            turn("assistant", f"Answer {i}."),
            turn("user", "More?"),
            turn("assistant", "No."),
        ]
        for i in range(7)
    ]
    chats[0][0]["name"] = "alice"
    chats.append([turn("user", "Nobody answers this.")])
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    tokenizer = chatml_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY, tokenizer_name_or_path=str(tmp_path / "tok"))
    dm = SFTDataModule(
        data_files=str(data),
        messages_field="messages",
        chat_template=True,
        system_prompt="Be brief.",
        max_length=120,
        batch_size=2,
        val_fraction=0.25,
    )
    fit = trainer(
        tmp_path,
        max_epochs=1,
        strategy=DataOrderEnsemble(num_replicas=2, seed=0),
        callbacks=[SelectionMergeCallback(seed=0)],
    )
    with pytest.warns(UserWarning, match="dropped 1 of .* no assistant turn"):
        fit.fit(module, dm)
    assert len(dm.train_set) + len(dm.val_set) == 7
    assert math.isfinite(float(fit.callback_metrics["val_loss"]))
    ids, labels = dm.train_set[0]["input_ids"], dm.train_set[0]["labels"]
    assert labelled(module.tokenizer, ids, labels).endswith(".<|im_end|>\nNo.<|im_end|>\n")
