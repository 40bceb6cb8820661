"""Demo: fine-tune K replicas of a tiny GPT-2 on different data orders, merge them, compare.

Runs offline on CPU in well under a minute::

    python examples/demo.py --replicas 4 --out demo_output

Each replica starts from the same "pre-trained" weights and is fine-tuned on the same lines of
text in its own order; the replicas are saved as Hugging Face directories and merged with the
``lightning-selmerge merge`` command (weighted average, parameter selection, selection + resample).
Each merged model is loaded back with ``from_pretrained`` and scored on the training lines.
"""

from __future__ import annotations

import argparse
import codecs
import shutil
import this
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from lightning_selmerge.cli import main as selmerge

TEXT_LINES = [line for line in codecs.decode(this.s, "rot13").splitlines() if line.strip()]


def encode(lines: list[str], length: int = 64) -> torch.Tensor:
    rows = [list(line.encode()[:length]) + [0] * max(0, length - len(line)) for line in lines]
    return torch.tensor(rows)


def lm_loss(model: GPT2LMHeadModel, tokens: torch.Tensor) -> float:
    labels = tokens.masked_fill(tokens == 0, -100)
    with torch.no_grad():
        return model(input_ids=tokens, labels=labels).loss.item()


def fine_tune(
    model: GPT2LMHeadModel, tokens: torch.Tensor, order: torch.Tensor, lr: float, epochs: int
) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(order), 4):
            batch = tokens[order[start : start + 4]]
            loss = model(input_ids=batch, labels=batch.masked_fill(batch == 0, -100)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    torch.manual_seed(args.seed)
    tokens = encode(TEXT_LINES)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    base = GPT2LMHeadModel(config).eval()
    shutil.rmtree(args.out, ignore_errors=True)
    base.save_pretrained(args.out / "base")

    replica_dirs, replica_losses = [], []
    for k in range(args.replicas):
        model = GPT2LMHeadModel.from_pretrained(args.out / "base")
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(1000 + k))
        fine_tune(model, tokens, order, lr=3e-3, epochs=args.epochs)
        replica_dirs.append(str(args.out / f"replica_{k}"))
        model.save_pretrained(replica_dirs[-1])
        replica_losses.append(lm_loss(model, tokens))
        print(f"replica {k}: loss {replica_losses[-1]:.4f}")

    results = {
        "base (pre-trained)": lm_loss(base, tokens),
        "mean single replica": sum(replica_losses) / len(replica_losses),
    }
    for label, flags in [
        ("weighted average", ["--method", "average"]),
        ("selection", ["--method", "selection"]),
        ("selection + resample 1", ["--method", "selection", "--resample", "1"]),
    ]:
        out = args.out / label.replace(" ", "_").replace("+", "plus")
        code = selmerge(
            [
                "merge",
                *replica_dirs,
                "--base",
                str(args.out / "base"),
                *flags,
                "--seed",
                str(args.seed),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        if code != 0:
            raise SystemExit(code)
        results[label] = lm_loss(GPT2LMHeadModel.from_pretrained(out), tokens)

    print(f"\n{'model':<26} train loss")
    for label, loss in results.items():
        print(f"{label:<26} {loss:.4f}")


if __name__ == "__main__":
    main()
