"""Tables and figures of ``benchmarks/reproduce_paper.py`` from its ``results.json``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

MERGES = ["weighted average", "selection", "selection + resample(1)"]


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def row(label: str, values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    per_seed = ", ".join(f"{v * scale:.{digits}f}" for v in values)
    return f"| {label} | {mean_sd(values, scale, digits)} | {per_seed} |"


def accuracy_rows(runs: list[dict[str, Any]], key: str = "fp32") -> dict[str, list[float]]:
    """Accuracy per seed of the mean / best replica and of each merge."""
    rows = {
        "mean single replica": [statistics.mean(r[key]["replicas"]) for r in runs],
        "best single replica": [max(r[key]["replicas"]) for r in runs],
    }
    for label in MERGES:
        rows[label] = [r[key][label] for r in runs]
    return rows


def table_a(runs: list[dict[str, Any]]) -> list[str]:
    first = runs[0]
    lines = [
        f"{first['train_samples']} training / {first['held_out']} held-out snippets, seeds "
        + ", ".join(str(r["seed"]) for r in runs),
        "",
        "| held-out accuracy (%) | mean ± sd over seeds | per seed |",
        "| --- | --- | --- |",
        row("pre-trained encoder + new head (no fine-tuning)", [r["pretrained"] for r in runs]),
    ]
    rows = accuracy_rows(runs)
    lines += [row(label, values) for label, values in rows.items()]
    lines += [
        "",
        "| paired difference (percentage points, same seed) | mean ± sd over seeds | per seed |",
        "| --- | --- | --- |",
    ]
    mean = rows["mean single replica"]
    for label in MERGES:
        lines.append(row(f"{label} − mean single replica", diff(rows[label], mean)))
    lines.append(
        row(
            "selection + resample(1) − weighted average",
            diff(rows["selection + resample(1)"], rows["weighted average"]),
        )
    )
    lines.append(
        row("best single replica − mean single replica", diff(rows["best single replica"], mean))
    )
    lines += [
        "",
        "| epoch | replica mean val acc (%) | best replica | merged (selection + resample(1)) "
        "| merged − replica mean (pp) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in range(len(first["epochs"])):
        metrics = [r["epochs"][e] for r in runs]
        k = len(first["fp32"]["replicas"])
        rep = [m["replica_mean/val_acc"] for m in metrics]
        best = [max(m[f"replica_{i}/val_acc"] for i in range(k)) for m in metrics]
        merged = [m["val_acc"] for m in metrics]
        lines.append(
            f"| {e + 1} | {mean_sd(rep, 100)} | {mean_sd(best, 100)} | {mean_sd(merged, 100)} "
            f"| {mean_sd(diff(merged, rep), 100)} |"
        )
    return lines


def diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def table_b(runs: list[dict[str, Any]]) -> list[str]:
    first = runs[0]
    last = len(first["epochs"])
    lines = [
        f"{first['train_samples']} training / {first['held_out_samples']} held-out utterances, "
        "seeds " + ", ".join(str(r["seed"]) for r in runs),
        "",
        "| Spearman rho(first-epoch position, loss) | after epoch 1 | per seed "
        f"| after epoch {last} | per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, get in (
        ("single replicas (mean over K per seed)", lambda ep: statistics.mean(ep["replica_rho"])),
        ("merged, selection + resample(1)", lambda ep: ep["merged_rho"]),
    ):
        cells = []
        for e in (0, last - 1):
            values = [get(r["epochs"][e]) for r in runs]
            cells += [mean_sd(values, 1, 3), ", ".join(f"{v:+.3f}" for v in values)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    all_rho = [x for r in runs for x in r["epochs"][last - 1]["replica_rho"]]
    lines += [
        f"| every single replica (K × seeds = {len(all_rho)}), after epoch {last} "
        f"| | | {mean_sd(all_rho, 1, 3)} | min {min(all_rho):+.3f}, max {max(all_rho):+.3f} |",
        "",
        "| held-out loss (nats per token, mean per utterance) | mean ± sd over seeds | per seed |",
        "| --- | --- | --- |",
    ]
    losses = [r["held_out_loss"] for r in runs]
    lines.append(row("mean single replica", [statistics.mean(x["replicas"]) for x in losses], 1, 4))
    for label in MERGES:
        lines.append(row(label, [x[label] for x in losses], 1, 4))
    lines.append(row("pre-trained (no fine-tuning)", [x["base"] for x in losses], 1, 4))
    return lines


def table_c(runs: list[dict[str, Any]]) -> list[str]:
    b16 = [r["bf16"] for r in runs]
    lines = [
        "| share of floating-point elements equal to the pre-trained value (%) "
        "| mean ± sd over seeds |",
        "| --- | --- |",
        f"| float32 replica (mean over K) | {mean_sd([x['at_base_fp32']['replica_mean'] for x in b16], 100)} |",  # noqa: E501
        f"| bf16-rounded replica (mean over K) | {mean_sd([x['at_base']['replica_mean'] for x in b16], 100)} |",  # noqa: E501
        f"| bf16, at the base in all K replicas | {mean_sd([x['at_base']['all_replicas'] for x in b16], 100)} |",  # noqa: E501
        f"| float32 replica, without the word embeddings | {mean_sd([x['at_base_fp32']['replica_mean_without_word_embeddings'] for x in b16], 100)} |",  # noqa: E501
        f"| bf16-rounded replica, without the word embeddings | {mean_sd([x['at_base']['replica_mean_without_word_embeddings'] for x in b16], 100)} |",  # noqa: E501
    ]
    for n in range(5):
        label = "selection" if n == 0 else f"selection + resample({n})"
        values = [x[f"at_base_after/{label}"] for x in b16]
        lines.append(f"| bf16 merge by {label} | {mean_sd(values, 100)} |")
    lines += [
        "",
        "| bf16-rounded replicas, held-out accuracy (%) | mean ± sd over seeds | per seed |",
        "| --- | --- | --- |",
        row("mean single replica (bf16)", [statistics.mean(x["replicas"]) for x in b16]),
        row("weighted average", [x["weighted average"] for x in b16]),
    ]
    for n in range(5):
        label = "selection" if n == 0 else f"selection + resample({n})"
        lines.append(row(label, [x[label] for x in b16]))
    sel = [x["selection"] for x in b16]
    lines += ["", "| paired difference (pp) | mean ± sd | per seed |", "| --- | --- | --- |"]
    for n in range(1, 5):
        label = f"selection + resample({n})"
        lines.append(row(f"{label} − selection", diff([x[label] for x in b16], sel)))
    return lines


def table_d(runs_d: list[dict[str, Any]], runs_a: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| held-out accuracy (%) | different data orders (a) | fixed batches, reordered (d) "
        "| per seed (d) |",
        "| --- | --- | --- | --- |",
    ]
    rows_d = accuracy_rows(runs_d)
    seeds_d = {r["seed"] for r in runs_d}
    rows_a = accuracy_rows([r for r in runs_a if r["seed"] in seeds_d])
    for label, values in rows_d.items():
        lines.append(
            f"| {label} | {mean_sd(rows_a.get(label, []) or [float('nan')], 100)} "
            f"| {mean_sd(values, 100)} | " + ", ".join(f"{v * 100:.2f}" for v in values) + " |"
        )
    for rows, name in ((rows_a, "a"), (rows_d, "d")):
        gain = diff(rows["selection + resample(1)"], rows["mean single replica"])
        lines.append(
            f"| selection + resample(1) − mean single replica, ({name}) | | "
            f"{mean_sd(gain, 100)} pp | " + ", ".join(f"{v * 100:+.2f}" for v in gain) + " |"
        )
    return lines


def write_report(results: dict[str, Any]) -> str:
    args = results["args"]
    lines = [
        f"K = {args['replicas']} replicas, {args['epochs']} epochs; run time "
        f"{results['seconds'].get('total', 0) / 60:.1f} min "
        + "("
        + ", ".join(
            f"{p}: {sum(r['seconds'] for r in results[p]) / 60:.1f} min"
            for p in "abd"
            if results[p]
        )
        + ")",
        "",
    ]
    if results["a"]:
        lines += ["### (a) Classification (Table 1 analogue)", "", *table_a(results["a"]), ""]
    if results["b"]:
        lines += ["### (b) LM fine-tuning: imbalance (Fig. 1 / Fig. 3)", "", *table_b(results["b"])]
        lines.append("")
    if results["a"] and "bf16" in results["a"][0]:
        lines += ["### (c) Replicas rounded to bf16 before merging", "", *table_c(results["a"])]
        lines.append("")
    if results["d"]:
        lines += [
            "### (d) fixed_batches ablation (Table 4)",
            "",
            *table_d(results["d"], results["a"]),
        ]
    return "\n".join(lines) + "\n"


def write_figures(results: dict[str, Any], out: Path) -> None:
    from matplotlib.figure import Figure

    from lightning_selmerge.imbalance import plot_loss_by_position

    if results["b"]:
        runs = results["b"]
        last = len(runs[0]["epochs"])
        curves = {}
        for e in sorted({0, last - 1}):
            for key, name in (
                ("replica_segments", "replicas (mean)"),
                ("merged_segments", "merged"),
            ):
                values = [r["epochs"][e][key] for r in runs]
                curves[f"{name}, after epoch {e + 1}"] = torch.tensor(values).mean(dim=0)
        fig = plot_loss_by_position(curves, title="LM: training loss by first-epoch position")
        fig.savefig(out / "fig_loss_by_position.png", dpi=80)
    if results["a"]:
        runs = results["a"]
        epochs = range(1, len(runs[0]["epochs"]) + 1)
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for key, name in (("replica_mean/val_acc", "replica mean"), ("val_acc", "merged")):
            for r in runs:
                ax.plot(epochs, [100 * m[key] for m in r["epochs"]], alpha=0.25,
                        color="C0" if name == "merged" else "C1")  # fmt: skip
            mean = [100 * statistics.mean(r["epochs"][e - 1][key] for r in runs) for e in epochs]
            ax.plot(epochs, mean, marker="o", label=f"{name} (mean over seeds)",
                    color="C0" if name == "merged" else "C1")  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_xticks(list(epochs))
        ax.set_title("Classification: merged (selection + resample(1)) vs single replicas")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "fig_validation_by_epoch.png", dpi=80)
