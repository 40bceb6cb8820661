"""Example: K replicas of a small GPT-2 in one Lightning fit, merged three ways, held-out losses.

Runs offline on CPU::

    python examples/demo.py --replicas 4 --epochs 3 --out runs/demo_example

A byte-level GPT-2 built from a config learns the short utterances shipped in
``examples/data/chatterbot_topics.tsv``. ``DataOrderEnsemble`` trains the K replicas one after
another inside each epoch, each on its own order; ``SelectionMergeCallback`` merges them by
parameter selection + resample at the end of every epoch, and that epoch's validation runs on the
merged model. Afterwards the replicas and the merged model are saved as Hugging Face directories,
the replicas are merged again from disk with ``lightning-selmerge merge`` (weighted average, the
baseline), and every model is scored on the held-out utterances. TensorBoard logs go to
``OUT/tensorboard``; a rerun replaces the model directories under ``OUT``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import shutil
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from lightning_selmerge import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.cli import main as selmerge

DATA = Path(__file__).resolve().parent / "data" / "chatterbot_topics.tsv"
LENGTH = 48


def load_tokens() -> torch.Tensor:
    """Utterances as UTF-8 bytes, padded with 0 (ignored by the loss)."""
    with open(DATA, encoding="utf-8", newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle, delimiter="\t")]
    tokens = torch.zeros(len(texts), LENGTH, dtype=torch.long)
    for row, text in enumerate(texts):
        data = list(text.encode()[:LENGTH])
        tokens[row, : len(data)] = torch.tensor(data)
    return tokens


class ByteLM(LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        config = GPT2Config(vocab_size=256, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4)
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, labels=tokens.masked_fill(tokens == 0, -100)).loss

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch[0])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch[0]), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@torch.no_grad()
def held_out_loss(model: GPT2LMHeadModel, tokens: torch.Tensor) -> float:
    model.eval()
    return float(model(input_ids=tokens, labels=tokens.masked_fill(tokens == 0, -100)).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resample", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/demo_example"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    seed_everything(args.seed, verbose=False)
    for name in ("base", "merged_selection", "merged_average", "tensorboard", "replica_*"):
        for stale in args.out.glob(name):  # this script's own outputs only, never OUT itself
            shutil.rmtree(stale, ignore_errors=True)

    tokens = load_tokens()
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))
    train, held_out = tokens[order[200:]], tokens[order[:200]]
    module = ByteLM(lr=args.lr)
    module.model.save_pretrained(args.out / "base")

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        strategy=DataOrderEnsemble(num_replicas=args.replicas, seed=args.seed),
        callbacks=[
            SelectionMergeCallback(method="selection", resample=args.resample, seed=args.seed)
        ],
        logger=TensorBoardLogger(args.out, name="tensorboard"),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module,
        DataLoader(TensorDataset(train), batch_size=32),
        DataLoader(TensorDataset(held_out), batch_size=200),
    )

    results = {
        "base (before fine-tuning)": held_out_loss(
            GPT2LMHeadModel.from_pretrained(args.out / "base"), held_out
        )
    }
    replica_dirs = []
    for k, state in enumerate(trainer.strategy.replica_states()):
        replica = copy.deepcopy(module)
        replica.load_state_dict(state)
        replica_dirs.append(str(args.out / f"replica_{k}"))
        replica.model.save_pretrained(replica_dirs[-1])
        results[f"replica {k}"] = held_out_loss(replica.model, held_out)
    module.model.save_pretrained(args.out / "merged_selection")
    results["merged: selection + resample"] = held_out_loss(module.model, held_out)
    code = selmerge(
        [
            "merge",
            *replica_dirs,
            "--method",
            "average",
            "--out",
            str(args.out / "merged_average"),
            "--quiet",
        ]
    )
    if code != 0:
        raise SystemExit(code)
    results["merged: weighted average"] = held_out_loss(
        GPT2LMHeadModel.from_pretrained(args.out / "merged_average"), held_out
    )

    mean_replica = sum(v for k, v in results.items() if k.startswith("replica")) / args.replicas
    print(f"\nheld-out loss (nats/byte) after {args.epochs} epochs, K={args.replicas}")
    for label, loss in results.items():
        print(f"  {label:<30} {loss:.4f}")
    print(f"  {'mean single replica':<30} {mean_replica:.4f}")
    print(f"\nTensorBoard: tensorboard --logdir {args.out / 'tensorboard'}")


if __name__ == "__main__":
    main()
