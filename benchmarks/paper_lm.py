"""Setting (b) of ``benchmarks/reproduce_paper.py``: the data-order imbalance in LM fine-tuning.

The setting of ``benchmarks/reproduce_imbalance.py`` (all-MiniLM-L6-v2 made a causal LM, the
shipped ChatterBot utterances of at least 6 words, batch size 4, no dropout, train mode), with a
:class:`PositionLossMonitor` probing every training sample after *every* epoch, so that Spearman
rho(first-epoch position, loss) is read after epoch 1 and after the last epoch, for each replica
and for the merge (selection + resample(1), merged by :class:`SelectionMergeCallback` at each
epoch end). Held-out loss of the replicas and of the final merges as in reproduce_imbalance.
"""

from __future__ import annotations

import statistics
from argparse import Namespace
from typing import Any

import torch
from fit_support import quiet_trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from reproduce_imbalance import held_out_loss, load_example
from torch.utils.data import DataLoader, Subset

from lightning_selmerge import (
    DataOrderEnsemble,
    IndexedDataset,
    ParameterSelection,
    PositionLossMonitor,
    SelectionMergeCallback,
    WeightedAverage,
    merge_state_dicts,
)

SPLIT_SEED = 1234  # the split of reproduce_imbalance.py


class ImbalanceRecorder(Callback):
    """Copies the monitor's ``imbalance/*`` metrics after every epoch (put it last)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("imbalance/")}
        )


def run_lm_seed(args: Namespace, seed: int) -> dict[str, Any]:
    """One ensemble fit of the LM setting; rho and loss by position after every epoch."""
    example = load_example()
    seed_everything(seed, workers=True)
    texts, labels, _ = example.load_utterances(example.DATA, 1, 6)
    build_args = Namespace(task="lm", tiny=False, max_length=32, dropout=0.0)
    model, (input_ids, attention_mask) = example.build(build_args, texts, 1)
    encoded = example.Encoded(input_ids, attention_mask, labels)
    split = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held = split[: args.lm_held_out].tolist()
    train_ids = split[args.lm_held_out :][: args.lm_train_samples].tolist()
    train = IndexedDataset(Subset(encoded, train_ids))
    held_loader = DataLoader(Subset(encoded, held), batch_size=64)

    module = example.FineTune(model, args.lm_lr, "lm")
    monitor = PositionLossMonitor(probe_size=len(train), probe_batch_size=64)
    recorder = ImbalanceRecorder()
    trainer = Trainer(
        max_epochs=args.epochs,
        strategy=DataOrderEnsemble(num_replicas=args.replicas, seed=seed),
        callbacks=[
            monitor,
            SelectionMergeCallback(resample=1, seed=seed, validate_replicas=False),
            recorder,
        ],
        num_sanity_val_steps=0,
        **quiet_trainer_kwargs(),
    )
    base = {n: t.detach().clone() for n, t in module.state_dict().items()}
    trainer.fit(module, DataLoader(train, batch_size=args.lm_batch_size))
    strategy = trainer.strategy
    assert isinstance(strategy, DataOrderEnsemble)
    replicas = strategy.replica_states()

    def loss_of(state: dict[str, torch.Tensor]) -> float:
        module.load_state_dict(state)
        return held_out_loss(module, held_loader)

    losses: dict[str, Any] = {"base": loss_of(base), "replicas": [loss_of(s) for s in replicas]}
    for label, method in {
        "weighted average": WeightedAverage(),
        "selection": ParameterSelection(),
        "selection + resample(1)": ParameterSelection(resample=1),
    }.items():
        losses[label] = loss_of(merge_state_dicts(replicas, base=base, method=method, seed=seed))

    k, segments = args.replicas, monitor.num_segments
    per_epoch = []
    for metrics in recorder.epochs:
        per_epoch.append(
            {
                "replica_rho": [metrics[f"imbalance/replica_{r}/spearman"] for r in range(k)],
                "merged_rho": metrics["imbalance/merged/spearman"],
                "replica_segments": [
                    statistics.mean(
                        metrics[f"imbalance/replica_{r}/segment_{s:02d}_loss"] for r in range(k)
                    )
                    for s in range(segments)
                ],
                "merged_segments": [
                    metrics[f"imbalance/merged/segment_{s:02d}_loss"] for s in range(segments)
                ],
            }
        )
    return {
        "seed": seed,
        "train_samples": len(train),
        "held_out_samples": len(held),
        "epochs": per_epoch,
        "held_out_loss": losses,
    }
