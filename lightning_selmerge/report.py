"""Figures and a markdown summary from a run's TensorBoard logs.

Reads the scalars that :class:`~lightning_selmerge.ensemble.SelectionMergeCallback` and
:class:`~lightning_selmerge.imbalance.PositionLossMonitor` log and writes:

* ``loss_by_position.png``: mean probe loss per first-epoch position segment at the last probe,
  one curve per replica and one for the merged model (or the single run's curve): the paper's
  Fig. 1 / Fig. 3;
* ``validation.png``: the merged model's validation metric per epoch next to each replica's and
  their mean: the paper's Fig. 4;
* ``spearman.png``: Spearman rho(first-epoch position, loss) per probe, per model;
* ``summary.md``: the last values of all of these in two tables.

The K runs of replica jobs (``lightning-selmerge fit --replica k``: versions ``replica_000``,
``replica_001``, ... of one logger) are reported together, as one run whose models are the
replicas; the merge, made after the jobs, is not in their logs.

Example::

    from lightning_selmerge.report import write_report

    for path in write_report("runs/demo/version_0"):
        print(path)   # .../report/loss_by_position.png, validation.png, spearman.png, summary.md
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_selmerge.imbalance.figure import plot_loss_by_position, plot_series

__all__ = ["ReportError", "RunScalars", "load_scalars", "signed", "write_report"]

_REPLICA_METRIC = re.compile(r"^replica_(?P<k>\d+)/(?P<metric>.+)$")
_REPLICA_JOB = re.compile(r"^replica_(?P<k>\d{3,})$")
_HIGHER_IS_BETTER = re.compile(r"acc|f1|auc|precision|recall", re.IGNORECASE)


class ReportError(ValueError):
    """The log directory holds nothing to report (the message says what is missing)."""


@dataclass
class RunScalars:
    """Scalar series of one run: tag -> [(step, value)] sorted by step."""

    directory: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    #: the K runs of replica jobs, combined (their merge is not logged)
    replica_jobs: bool = False

    def last(self, tag: str) -> float:
        values = self.series.get(tag)
        return values[-1][1] if values else math.nan

    def last_step(self, tag: str) -> int | str:
        values = self.series.get(tag)
        return values[-1][0] if values else "-"


def _event_dirs(logdir: Path) -> list[Path]:
    return sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})


def _read_run(directory: Path) -> RunScalars:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    run = RunScalars(directory)
    for tag in accumulator.Tags()["scalars"]:
        points = {e.step: float(e.value) for e in accumulator.Scalars(tag)}  # last write wins
        run.series[tag] = sorted(points.items())
    return run


def load_scalars(logdir: str | Path, tag_prefix: str = "imbalance") -> RunScalars:
    """All scalars of the newest run under ``logdir`` that logged ``<tag_prefix>/*`` (the
    monitor's tags) or per-replica scalars (the directory whose events are newest, passing
    over a later ``validate`` run and a fit that stopped before its first log), else of the
    newest that logged any."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ReportError(
            f"{logdir} is not a directory: give the logger's directory of a fit run, e.g. "
            "runs/demo/version_0 (the TensorBoardLogger's version directory)."
        )
    dirs = _event_dirs(logdir)
    if not dirs:
        raise ReportError(
            f"no TensorBoard event files under {logdir}: give the logger's directory (e.g. "
            "runs/demo/version_0) of a fit run with a TensorBoardLogger."
        )
    dirs.sort(key=lambda d: max(p.stat().st_mtime for p in d.glob("events.out.*")), reverse=True)
    newest = None
    for run in map(_read_run, dirs):  # newest first, read one at a time
        newest = newest or (run if run.series else None)
        if _reportable(run, tag_prefix):  # a fit's run, not a later `validate` (val_loss alone)
            break
    else:
        run = newest
    if run is not None:
        jobs = _replica_jobs(run.directory, dirs)
        return _combined(run.directory.parent, jobs, tag_prefix) if len(jobs) > 1 else run
    raise ReportError(
        f"no scalars in the TensorBoard logs under {logdir} ({len(dirs)} run(s)): each fit "
        "stopped before its first log; give the directory of a fit that ran."
    )


def _reportable(run: RunScalars, tag_prefix: str) -> bool:
    """Whether ``run`` logged what a report shows: ``<tag_prefix>/*`` or per-replica scalars."""
    head = f"{tag_prefix}/"
    return any(tag.startswith(head) or _REPLICA_METRIC.match(tag) for tag in run.series)


def _replica_jobs(newest: Path, dirs: list[Path]) -> dict[int, Path]:
    """Replica job runs beside ``newest`` (``replica_NNN`` siblings; ``dirs`` newest first), by
    replica: ``newest``'s alone when it is not a replica job's."""
    if not _REPLICA_JOB.match(newest.name):
        return {}
    jobs: dict[int, Path] = {}
    for directory in dirs:
        match = _REPLICA_JOB.match(directory.name)
        if match and directory.parent == newest.parent:
            jobs.setdefault(int(match["k"]), directory)
    return dict(sorted(jobs.items()))


def _combined(directory: Path, jobs: dict[int, Path], tag_prefix: str) -> RunScalars:
    """The replica jobs' scalars as one run's: ``<tag_prefix>/X`` of job k as
    ``<tag_prefix>/replica_k/X``, any other tag as ``replica_k/tag``."""
    run = RunScalars(directory, replica_jobs=True)
    head = f"{tag_prefix}/"
    for k, job in jobs.items():
        for tag, values in _read_run(job).series.items():
            if tag.startswith(head):
                name = f"{head}replica_{k}/{tag.removeprefix(head)}"
            else:
                name = f"replica_{k}/{tag}"
            run.series[name] = values
    return run


def _position_curves(run: RunScalars, tag_prefix: str) -> dict[str, torch.Tensor]:
    """model name ("" = single run) -> last segment losses."""
    segment = re.compile(
        rf"^{re.escape(tag_prefix)}/(?:(?P<model>[^/]+)/)?segment_(?P<seg>\d+)_loss$"
    )
    segments: dict[str, dict[int, float]] = {}
    for tag in run.series:
        if match := segment.match(tag):
            segments.setdefault(match["model"] or "", {})[int(match["seg"])] = run.last(tag)
    return {
        model: torch.tensor([values[s] for s in sorted(values)])
        for model, values in sorted(segments.items(), key=lambda kv: _model_order(kv[0]))
    }


def _model_order(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"replica_(\d+)", name)
    return (0, int(match[1])) if match else (1, 0)


def _replica_metrics(run: RunScalars, metric: str) -> dict[str, list[tuple[int, float]]]:
    found = {}
    for tag, values in run.series.items():
        match = _REPLICA_METRIC.match(tag)
        if match and match["metric"] == metric:
            found[f"replica_{match['k']}"] = values
    return dict(sorted(found.items(), key=lambda kv: _model_order(kv[0])))


def signed(value: float, digits: int = 4) -> str:
    """``value`` with an explicit sign, rounded; a value that rounds to zero prints unsigned.

    Example:
        >>> signed(0.01234), signed(-0.00001), signed(-0.5)
        ('+0.0123', '0.0000', '-0.5000')
    """
    rounded = round(value, digits)
    if rounded == 0:
        return f"{0.0:.{digits}f}"
    return f"{rounded:+.{digits}f}"


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format=path.suffix.lstrip("."))
    os.replace(tmp, path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _validation_table(
    run: RunScalars, metric: str, replicas: dict[str, list[tuple[int, float]]], mode: str
) -> list[str]:
    """The summary's validation section: the merge (when logged), each replica, their mean."""
    replica_last = {name: values[-1][1] for name, values in replicas.items()}
    mean = sum(replica_last.values()) / len(replica_last)
    lines = [f"## Validation `{metric}` (last epoch)", "", "| model | value |", "| --- | ---: |"]
    if metric not in run.series:
        return [
            *lines,
            *(f"| {name} | {value:.4f} |" for name, value in replica_last.items()),
            f"| mean of replicas | {mean:.4f} |",
            "",
            "The merge is not in these logs: replica jobs are merged after they end. Score a "
            "merge with `lightning-selmerge validate --config CONFIG "
            "--model.init_args.config=null --model.init_args.model_name_or_path=MERGED_DIR`.",
            "",
        ]
    merged = run.last(metric)
    best, sign = (max, "positive") if mode == "max" else (min, "negative")
    return [
        *lines,
        f"| merged | {merged:.4f} |",
        *(f"| {name} | {value:.4f} |" for name, value in replica_last.items()),
        f"| mean of replicas | {mean:.4f} |",
        "",
        f"Merged minus mean of replicas: {signed(merged - mean)}; merged minus best "
        f"replica: {signed(merged - best(replica_last.values()))} ({sign} = the merge is "
        f"better: {'higher' if mode == 'max' else 'lower'} is better).",
        "",
    ]


def write_report(
    logdir: str | Path,
    out: str | Path | None = None,
    metric: str = "val_loss",
    mode: Literal["min", "max"] | None = None,
    tag_prefix: str = "imbalance",
) -> list[Path]:
    """Write the figures and ``summary.md`` for the newest run under ``logdir``.

    ``out`` defaults to ``<run directory>/report``; ``metric`` is the validation metric to
    compare (logged by the module, and as ``replica_k/<metric>`` by the merge callback);
    ``mode`` says whether lower (``"min"``, a loss) or higher (``"max"``, an accuracy) is
    better, as in ``ModelCheckpoint``; by default ``"max"`` for names with acc, f1, auc,
    precision or recall in them, else ``"min"``. ``tag_prefix`` is the
    :class:`~lightning_selmerge.imbalance.PositionLossMonitor`'s (default ``"imbalance"``).
    Returns the written paths. Each file is written to a temporary name and renamed.
    """
    if mode is None:
        mode = "max" if _HIGHER_IS_BETTER.search(metric) else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    tag_prefix = tag_prefix.rstrip("/")
    run = load_scalars(logdir, tag_prefix)
    out = Path(out) if out is not None else run.directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = ["# lightning_selmerge report", "", f"Run: `{run.directory}`", ""]

    curves = _position_curves(run, tag_prefix)
    if curves:
        fig = plot_loss_by_position(
            {name or "model": values for name, values in curves.items()},
            title="Probe loss by first-epoch position (last probe)",
        )
        _save(fig, out / "loss_by_position.png")
        written.append(out / "loss_by_position.png")
        spearman = {
            name or "model": run.series[tag]
            for name in curves
            if (tag := f"{tag_prefix}/{name}/spearman" if name else f"{tag_prefix}/spearman")
            in run.series
        }
        if spearman:
            fig = plot_series(
                spearman, "Spearman ρ(first-epoch position, loss)", "ρ", zero_line=True
            )
            _save(fig, out / "spearman.png")
            written.append(out / "spearman.png")
        lines += [
            "## Loss by first-epoch position (last probe)",
            "",
            "Negative rho: samples trained on early keep a higher loss (the imbalance).",
            "",
            "| model | step | Spearman rho | mean probe loss | first segment | last segment |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, values in curves.items():
            base = f"{tag_prefix}/{name}" if name else tag_prefix
            lines.append(
                f"| {name or 'model'} | {run.last_step(f'{base}/spearman')} "
                f"| {signed(run.last(f'{base}/spearman'))} "
                f"| {run.last(f'{base}/mean_loss'):.4f} | {float(values[0]):.4f} "
                f"| {float(values[-1]):.4f} |"
            )
        lines += [
            "",
            "step: the global step of each model's last probe (a merge is probed at the epochs "
            "that merged; replica jobs count their own steps).",
            "",
        ]

    replicas = _replica_metrics(run, metric)
    if replicas and (metric in run.series or run.replica_jobs):
        merged = {"merged": run.series[metric]} if metric in run.series else {}
        series = {**merged, **replicas}
        if f"replica_mean/{metric}" in run.series:
            series["replica_mean"] = run.series[f"replica_mean/{metric}"]
        title = f"Validation {metric}" + (": merged vs replicas" if merged else "")
        fig = plot_series(series, title, metric)
        _save(fig, out / "validation.png")
        written.append(out / "validation.png")
        lines += _validation_table(run, metric, replicas, mode)
    if not written:
        raise ReportError(
            f"{run.directory} has no {tag_prefix}/* or replica_k/{metric} scalars: train with "
            "SelectionMergeCallback (replica validation) and/or PositionLossMonitor and a "
            "TensorBoardLogger, or pass --metric with the validation metric's name (and "
            "--tag_prefix with the monitor's)."
        )
    _write_text("\n".join(lines), out / "summary.md")
    written.append(out / "summary.md")
    return written
