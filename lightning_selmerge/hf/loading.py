"""Build a Hugging Face model and its tokenizer from a local checkpoint or from a config dict.

Nothing here downloads: checkpoints load with ``local_files_only=True``, and a model built from a
config without a tokenizer path gets :func:`byte_tokenizer`, which needs no files at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = [
    "build_model",
    "byte_tokenizer",
    "check_model_source",
    "ensure_pad_token",
    "ensure_sequence_tokens",
    "load_tokenizer",
    "parse_dtype",
]

_DOWNLOAD_HINT = (
    "nothing is downloaded at run time: pass a local directory (e.g. one written by "
    "save_pretrained, or `hf download NAME --local-dir DIR`)"
)


def check_model_source(
    owner: str, model_name_or_path: str | None, config: Mapping[str, Any] | None
) -> None:
    """Raise unless exactly one of ``model_name_or_path`` and ``config`` is given."""
    if (model_name_or_path is None) == (config is None):
        given = "both" if config is not None else "neither"
        raise ValueError(
            f"{owner}: got {given} of model_name_or_path and config; pass exactly one: "
            "model_name_or_path='path/to/checkpoint' (a local directory) to fine-tune a saved "
            "model, or config={'model_type': 'gpt2', 'n_layer': 2, ...} to train one from scratch."
        )
    if config is not None and "model_type" not in config:
        raise ValueError(
            f"{owner}: config needs a 'model_type' key naming the architecture, e.g. "
            f"{{'model_type': 'gpt2', 'n_layer': 2, 'n_embd': 64, 'n_head': 4}}; got keys "
            f"{sorted(config)}."
        )


def parse_dtype(owner: str, torch_dtype: str | None) -> torch.dtype | str:
    """A torch floating dtype from its name (``"bfloat16"``), or ``"auto"``.

    ``None`` means ``torch.float32``, whatever the checkpoint's dtype: small optimizer updates
    are lost when rounded to bfloat16/float16 weights. Only ``"auto"`` keeps the checkpoint's.
    """
    if torch_dtype is None:
        return torch.float32
    if torch_dtype == "auto":
        return torch_dtype
    dtype = getattr(torch, torch_dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{owner}: torch_dtype={torch_dtype!r} is not a torch floating dtype; use one of "
            "'float32', 'bfloat16', 'float16', or 'auto' (the checkpoint's own dtype)."
        )
    return dtype


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer needing no files: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), then
    byte ``b`` as id ``b + 3`` (ByT5's ids).

    Unlike ``ByT5Tokenizer`` it adds no special token: ``tokenizer(prompt)`` ends with the
    prompt's last byte, as the prompt part of a training example does (``sft_features``
    appends EOS after the response only), so generating from it continues the text. It is a
    ``tokenizers`` fast tokenizer: ``save_pretrained`` writes ``tokenizer.json`` and
    ``AutoTokenizer.from_pretrained`` loads it back as it was.

    Example:
        >>> tok = byte_tokenizer()
        >>> len(tok), tok.pad_token_id, tok.eos_token_id
        (259, 0, 1)
        >>> tok("hé")["input_ids"]
        [107, 198, 172]
        >>> tok.decode([107, 198, 172, tok.eos_token_id])
        'hé</s>'
    """
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({char: byte + 3 for byte, char in bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _load_error(owner: str, what: str, source: str, err: Exception) -> ValueError:
    reason = str(err) if Path(source).is_dir() else "no such local directory nor cached model"
    return ValueError(
        f"{owner}: cannot load a {what} from {source!r} ({reason}); {_DOWNLOAD_HINT}."
    )


def _mismatch_error(
    owner: str, source: str, saved: PreTrainedConfig, model_kwargs: Mapping[str, Any]
) -> ValueError:
    """The error for a checkpoint whose weights do not fit the shapes ``model_kwargs`` give."""
    changed = {
        key: getattr(saved, key)
        for key, value in model_kwargs.items()
        if hasattr(saved, key) and getattr(saved, key) != value
    }
    if changed:
        ours = ", ".join(f"{key}={model_kwargs[key]!r}" for key in changed)
        theirs = ", ".join(f"{key}={value!r}" for key, value in changed.items())
        cause = f"the checkpoint was saved with {theirs}, the module asks for {ours}"
        keep = f"set {theirs} to keep its weights, or "
    else:
        cause = "transformers' load report above names them"
        keep = ""
    return ValueError(
        f"{owner}: weights in {source!r} do not fit the model's shapes ({cause}); {keep}pass "
        "ignore_mismatched_sizes=True to start those weights anew (e.g. a new classifier head)."
    )


def load_tokenizer(owner: str, name_or_path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)`` with a clear error."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _load_error(owner, "tokenizer", name_or_path, err) from err


def ensure_sequence_tokens(owner: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give an encoder's tokenizer (BERT: ``[CLS] ... [SEP]``, no BOS or EOS) made a causal LM's
    its ``[SEP]`` as EOS and its ``[CLS]`` as BOS, as Hugging Face's encoder-decoder recipe does:
    a response then ends with EOS (generation stops there) and the model's config gets the ids.

    Example:
        >>> from transformers import BertTokenizerFast
        >>> from tokenizers import Tokenizer, models
        >>> vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
        >>> tok = BertTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "[UNK]")),
        ...                         pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        ...                         sep_token="[SEP]")
        >>> ensure_sequence_tokens("CausalLMModule", tok)
        >>> tok.eos_token, tok.bos_token
        ('[SEP]', '[CLS]')
    """
    if tokenizer.eos_token is not None or tokenizer.sep_token is None:
        return
    tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    rank_zero_info(
        f"{owner}: {type(tokenizer).__name__} has no EOS token; using its separator "
        f"{tokenizer.sep_token!r} as EOS and {tokenizer.bos_token!r} as BOS (a causal LM's "
        "responses end with EOS)."
    )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token (GPT-2, Llama) its EOS token as pad token."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has neither a pad nor an EOS token; set "
            "tokenizer.pad_token before training (and resize the model's embeddings)."
        )
    tokenizer.pad_token = tokenizer.eos_token


def _make_decoder(owner: str, config: PreTrainedConfig) -> bool:
    """Whether ``config`` is an encoder's (``is_decoder=False``) that a causal LM must flip."""
    if getattr(config, "is_decoder", None) is not False:
        return False
    rank_zero_info(
        f"{owner}: {config.model_type} config has is_decoder=False; setting is_decoder=True "
        "for causal attention (a causal LM must not see the tokens it predicts)."
    )
    return True


def build_model(
    owner: str,
    auto_class: Any,
    tokenizer: PreTrainedTokenizerBase,
    model_name_or_path: str | None,
    config: Mapping[str, Any] | None,
    torch_dtype: str | None,
    causal: bool = False,
    ignore_mismatched_sizes: bool = False,
    **model_kwargs: Any,
) -> PreTrainedModel:
    """Load ``auto_class`` from a local checkpoint or build it from ``config``, for ``tokenizer``.

    The model's special-token ids follow the tokenizer (``pad_token_id`` always: it is what
    sequence classification pools on; EOS and BOS where the checkpoint has none, in the
    generation config too), and its vocabulary covers the tokenizer: a config gets
    ``vocab_size=len(tokenizer)`` unless it names a larger one, a checkpoint whose embeddings are
    too small is resized. ``model_kwargs`` (e.g. ``num_labels``) go to the config. ``torch_dtype``
    goes through :func:`parse_dtype` (default float32). With ``causal=True``, an encoder config
    (``is_decoder=False``, e.g. BERT) gets ``is_decoder=True``: causal attention, so a token
    never sees the tokens it is trained to predict. A checkpoint whose weights do not fit the
    model's shapes (a classifier's head for another ``num_labels``) is refused with the fix,
    unless ``ignore_mismatched_sizes`` (transformers' argument) starts those weights anew.
    """
    dtype = parse_dtype(owner, torch_dtype)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.eos_token_id,
    }
    if config is not None:
        if ignore_mismatched_sizes:
            raise ValueError(
                f"{owner}: ignore_mismatched_sizes=True applies to a checkpoint's weights; a "
                "model built from config has none: drop the argument."
            )
        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        vocab = int(kwargs.pop("vocab_size", len(tokenizer)))
        if vocab < len(tokenizer):
            raise ValueError(
                f"{owner}: config vocab_size={vocab} is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens; drop vocab_size from the config (it defaults to "
                "len(tokenizer)) or give a larger one."
            )
        for key, value in model_kwargs.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(
                    f"{owner}: config sets {key}={kwargs[key]!r} but the module argument "
                    f"{key}={value!r}; give it once, as the module argument."
                )
        hf_config = AutoConfig.for_model(
            config["model_type"], **{**kwargs, **special, **model_kwargs}, vocab_size=vocab
        )
        if causal and _make_decoder(owner, hf_config):
            hf_config.is_decoder = True
        model = auto_class.from_config(hf_config, dtype=None if dtype == "auto" else dtype)
    else:
        assert model_name_or_path is not None
        try:
            saved = AutoConfig.from_pretrained(model_name_or_path, local_files_only=True)
            if causal and _make_decoder(owner, saved):
                model_kwargs = {**model_kwargs, "is_decoder": True}
            model = auto_class.from_pretrained(
                model_name_or_path,
                local_files_only=True,
                dtype=dtype,
                ignore_mismatched_sizes=ignore_mismatched_sizes,
                **model_kwargs,
            )
        except (OSError, ValueError) as err:
            raise _load_error(owner, "model", model_name_or_path, err) from err
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            raise _mismatch_error(owner, model_name_or_path, saved, model_kwargs) from err
        # from_pretrained returns an eval-mode model and Lightning keeps submodules' modes as it
        # finds them: without this the fine-tune would run with dropout off. Train mode, with
        # the checkpoint's own dropout, as transformers' Trainer does.
        model.train()
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        for key, value in special.items():
            # pad: what the batches are padded with (a classifier pools on it), whatever the
            # checkpoint's config says; EOS/BOS where the checkpoint has none
            if value is not None and (key == "pad_token_id" or getattr(model.config, key) is None):
                setattr(model.config, key, value)
    generation = getattr(model, "generation_config", None)
    for key, value in special.items():  # built before the ids were set: generation stops at EOS
        if generation is not None and value is not None and getattr(generation, key) is None:
            setattr(generation, key, value)
    return model
