"""LightningModules around Hugging Face models: causal-LM fine-tuning and sequence classification.

Both follow the package's batch contract (:mod:`lightning_selmerge.data.indexed`): batches are
dicts of ``input_ids``, ``attention_mask``, ``labels`` and ``sample_index`` (never passed to the
model); ``training_step`` returns ``{"loss", "sample_loss"}`` and ``per_sample_loss(batch)`` gives
one loss per example, so :class:`~lightning_selmerge.imbalance.PositionLossMonitor` works as is.
``self.model`` is the Hugging Face model and ``self.tokenizer`` its tokenizer, which is what
:class:`~lightning_selmerge.ensemble.SelectionMergeCallback` (``save_dir=...``) exports.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_selmerge.data.indexed import SAMPLE_INDEX_KEY, SAMPLE_LOSS_KEY
from lightning_selmerge.ensemble.strategy import DataOrderEnsemble
from lightning_selmerge.hf.export import save_pretrained
from lightning_selmerge.hf.loading import (
    build_model,
    byte_tokenizer,
    check_model_source,
    ensure_pad_token,
    ensure_sequence_tokens,
    load_tokenizer,
)
from lightning_selmerge.hf.lora import with_lora
from lightning_selmerge.hf.optim import adamw_with_warmup, check_schedule
from lightning_selmerge.imbalance.losses import (
    causal_lm_per_sample_loss,
    sequence_classification_per_sample_loss,
)

__all__ = ["CausalLMModule", "SequenceClassificationModule"]

Batch = Mapping[str, torch.Tensor]
_NOT_MODEL_INPUTS = frozenset({"labels", SAMPLE_INDEX_KEY})


def _mean_valid(per_sample: torch.Tensor) -> torch.Tensor:
    """Mean over the examples whose loss is defined (NaN marks an example without targets)."""
    valid = ~per_sample.isnan()
    return torch.where(valid, per_sample, 0.0).sum() / valid.sum().clamp(min=1)


class _HFModule(LightningModule):
    """Shared construction, optimisation and steps; subclasses pick the head and the metrics."""

    auto_class: Any = None
    #: peft's ``task_type`` for ``lora`` adapters
    lora_task_type: str = ""
    #: a causal LM: encoder configs (``is_decoder=False``, e.g. BERT) get causal attention.
    causal: bool = False

    def _build(
        self,
        model_name_or_path: str | None,
        config: Mapping[str, Any] | None,
        tokenizer_name_or_path: str | None,
        learning_rate: float,
        weight_decay: float,
        warmup_steps: int,
        lr_schedule: str,
        torch_dtype: str | None,
        lora: Mapping[str, Any] | None,
        gradient_checkpointing: bool,
        **model_kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        check_model_source(owner, model_name_or_path, config)
        check_schedule(owner, lr_schedule, warmup_steps)
        if learning_rate <= 0:
            raise ValueError(f"{owner}: learning_rate={learning_rate} must be > 0.")
        tokenizer_source = tokenizer_name_or_path or model_name_or_path
        self.tokenizer = (
            byte_tokenizer()
            if tokenizer_source is None
            else load_tokenizer(owner, tokenizer_source)
        )
        if self.causal:
            ensure_sequence_tokens(owner, self.tokenizer)
        ensure_pad_token(self.tokenizer)
        self.model = build_model(
            owner,
            self.auto_class,
            self.tokenizer,
            model_name_or_path,
            config,
            torch_dtype,
            causal=self.causal,
            **model_kwargs,
        )
        if gradient_checkpointing:  # non-reentrant: a frozen input (LoRA's base) is fine
            # transformers 5 renamed it (the old name warns, and goes in v6); 4.x has the old
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            enable = enable or self.model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if lora is not None:
            self.model = with_lora(owner, self.model, lora, self.lora_task_type)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule

    def forward(self, batch: Batch) -> Any:
        """The model's output on the batch's model inputs (``labels``/``sample_index`` dropped)."""
        return self.model(**{k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS})

    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        """One loss per example, shape ``[B]`` (NaN for an example without targets)."""
        return self._per_sample(self(batch).logits, batch["labels"])

    def _per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        per_sample = self.per_sample_loss(batch)
        loss = _mean_valid(per_sample)
        # under DataOrderEnsemble the steps cycle through the replicas, and one curve of them
        # would be a sawtooth: the progress bar shows it beside `replica`, while the logger
        # gets SelectionMergeCallback's replica_k/train_loss_step and replica_k/train_loss
        logger = not isinstance(self.trainer.strategy, DataOrderEnsemble)
        self.log("train_loss", loss, prog_bar=True, logger=logger, batch_size=len(per_sample))
        return {"loss": loss, SAMPLE_LOSS_KEY: per_sample.detach()}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch).logits
        per_sample = self._per_sample(logits, batch["labels"])
        # on several ranks each validates a slice of the data: the merge's value is their mean
        loss = _mean_valid(per_sample)
        self.log("val_loss", loss, prog_bar=True, batch_size=len(per_sample), sync_dist=True)
        self._validation_metrics(logits, batch["labels"])

    def _validation_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Hook for metrics beyond ``val_loss``."""

    def save_pretrained(self, directory: str | Path, overwrite: bool = True) -> Path:
        """Save the model and its tokenizer to ``directory`` (one directory, written atomically)
        that ``from_pretrained`` and ``AutoTokenizer.from_pretrained`` load; after an ensemble
        fit, the merged model. See :func:`lightning_selmerge.hf.export.save_pretrained`."""
        return save_pretrained(self.model, self.tokenizer, directory, overwrite=overwrite)

    def configure_optimizers(self) -> Any:
        return adamw_with_warmup(
            self, self.learning_rate, self.weight_decay, self.warmup_steps, self.lr_schedule
        )


class CausalLMModule(_HFModule):
    """Fine-tune (or train from a config) a Hugging Face causal language model.

    The loss of an example is its next-token cross-entropy averaged over the tokens whose label
    is not -100 (so prompt and padding do not count), and the batch loss is the mean over
    examples: every sequence weighs the same, whatever its length.

    Args:
        model_name_or_path: a local checkpoint directory (or a name already in the Hugging Face
            cache) to fine-tune; nothing is downloaded. Exclusive with ``config``.
        config: build a fresh model from this dict, which needs ``model_type``, e.g.
            ``{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4}``;
            ``vocab_size`` defaults to the tokenizer's size. An encoder (config or checkpoint
            with ``is_decoder=False``, e.g. BERT) is made a decoder: causal attention.
        tokenizer_name_or_path: local tokenizer directory; default ``model_name_or_path``, or
            for a ``config`` model a file-free byte-level tokenizer (``ByT5Tokenizer``, 259
            tokens). A tokenizer without pad token gets its EOS token as pad.
        learning_rate: AdamW learning rate (peak, after warmup).
        weight_decay: AdamW weight decay, applied to matrices only (not to biases and norms).
        warmup_steps: linear warmup steps (per replica under ``DataOrderEnsemble``).
        lr_schedule: after warmup, ``"constant"``, or ``"linear"`` / ``"cosine"`` decay to 0
            at the end of training. ``"constant"`` with no warmup uses no scheduler.
        torch_dtype: the weights' dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, or
            ``"auto"`` (the checkpoint's); default float32.
        lora: train LoRA adapters instead of every weight: ``peft.LoraConfig``'s settings,
            e.g. ``{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}``
            (needs peft). The frozen base is held once for all replicas, the merge and the
            exports are the adapters' (load them with ``PeftModel.from_pretrained``).
        gradient_checkpointing: recompute each block's activations in the backward pass
            instead of keeping them (transformers' activation checkpointing, non-reentrant):
            less memory for a longer step, the same gradients.

    Example:
        >>> module = CausalLMModule(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16,
        ...                                 "n_head": 2, "n_positions": 32})
        >>> batch = module.tokenizer(["hi there"], return_tensors="pt")
        >>> batch["labels"] = batch["input_ids"].clone()
        >>> module.per_sample_loss(batch).shape
        torch.Size([1])
    """

    auto_class = AutoModelForCausalLM
    causal = True
    lora_task_type = "CAUSAL_LM"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        torch_dtype: str | None = None,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._build(
            model_name_or_path,
            config,
            tokenizer_name_or_path,
            learning_rate,
            weight_decay,
            warmup_steps,
            lr_schedule,
            torch_dtype,
            lora,
            gradient_checkpointing,
        )

    def _per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_per_sample_loss(logits, labels)


class SequenceClassificationModule(_HFModule):
    """Fine-tune (or train from a config) a Hugging Face sequence classifier.

    Logs ``val_loss`` and ``val_acc`` (accuracy over all validation examples). Batches carry
    class ids in ``labels``, shape ``[B]``.

    Args:
        model_name_or_path: a local checkpoint directory (or a name already in the Hugging Face
            cache); its classification head is new when the checkpoint has none. Exclusive with
            ``config``.
        config: build a fresh model from this dict, which needs ``model_type``, e.g.
            ``{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4}``.
        tokenizer_name_or_path: local tokenizer directory; default ``model_name_or_path``, or
            for a ``config`` model a file-free byte-level tokenizer (``ByT5Tokenizer``). The
            model's ``pad_token_id`` is the tokenizer's, so decoder models pool the last real
            token.
        num_labels: number of classes.
        learning_rate: AdamW learning rate (peak, after warmup).
        weight_decay: AdamW weight decay, applied to matrices only (not to biases and norms).
        warmup_steps: linear warmup steps (per replica under ``DataOrderEnsemble``).
        lr_schedule: after warmup, ``"constant"``, or ``"linear"`` / ``"cosine"`` decay to 0
            at the end of training. ``"constant"`` with no warmup uses no scheduler.
        torch_dtype: the weights' dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, or
            ``"auto"`` (the checkpoint's); default float32.
        ignore_mismatched_sizes: start anew the checkpoint's weights whose shapes do not fit
            (a classifier checkpoint's head for another ``num_labels``), as transformers'
            ``from_pretrained`` argument does; without it such a checkpoint is refused.
        lora: train LoRA adapters (and the classification head) instead of every weight:
            ``peft.LoraConfig``'s settings, e.g. ``{"r": 8, "target_modules": ["query",
            "value"]}`` (needs peft). The frozen base is held once for all replicas, the merge
            and the exports are the adapters' and the head's.
        gradient_checkpointing: recompute each block's activations in the backward pass
            instead of keeping them (transformers' activation checkpointing, non-reentrant):
            less memory for a longer step, the same gradients.

    Example:
        >>> module = SequenceClassificationModule(
        ...     config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2},
        ...     num_labels=3)
        >>> batch = module.tokenizer(["yes", "no way"], padding=True, return_tensors="pt")
        >>> batch["labels"] = torch.tensor([0, 2])
        >>> module.per_sample_loss(batch).shape
        torch.Size([2])
    """

    auto_class = AutoModelForSequenceClassification
    lora_task_type = "SEQ_CLS"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        num_labels: int = 2,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        torch_dtype: str | None = None,
        ignore_mismatched_sizes: bool = False,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(
                f"SequenceClassificationModule: num_labels={num_labels}; a classifier needs at "
                "least 2 classes."
            )
        self.save_hyperparameters()
        self.num_labels = num_labels
        self._build(
            model_name_or_path,
            config,
            tokenizer_name_or_path,
            learning_rate,
            weight_decay,
            warmup_steps,
            lr_schedule,
            torch_dtype,
            lora,
            gradient_checkpointing,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            num_labels=num_labels,
        )
        self.val_acc = MulticlassAccuracy(
            num_classes=num_labels, average="micro", ignore_index=-100
        )

    def _per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sequence_classification_per_sample_loss(logits, labels)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the class names the data gave the config (ClassificationDataModule): a module loaded
        # from the checkpoint is built from hparams, whose config does not hold them
        checkpoint["id2label"] = dict(self.model.config.id2label)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        id2label = checkpoint.get("id2label")
        if id2label:
            names = {int(i): str(name) for i, name in id2label.items()}
            self.model.config.id2label = names
            self.model.config.label2id = {name: i for i, name in names.items()}

    def _validation_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.val_acc.update(logits.argmax(dim=-1), labels)
        self.log("val_acc", self.val_acc, prog_bar=True)
