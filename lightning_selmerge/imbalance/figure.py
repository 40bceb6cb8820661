"""The figures: loss by first-epoch position (the paper's Fig. 1 / 3) and per-epoch series.

Every figure draws a model the same way (:func:`model_style`): ``replica_k`` in the k-th color
of matplotlib's cycle, thin; ``merged`` thick black with diamonds, on top; ``replica_mean``
dashed gray. Legends sit outside the axes, so they never cover a point.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["model_style", "plot_loss_by_position", "plot_series"]

_REPLICA = re.compile(r"replica_(\d+)")


def model_style(name: str, index: int = 0) -> dict:
    """Matplotlib line style of the model ``name`` (``index``: its place among the others).

    Example:
        >>> model_style("merged")["color"], model_style("replica_2")["color"]
        ('black', 'C2')
    """
    if name == "merged":
        return {"color": "black", "linewidth": 2.4, "marker": "D", "markersize": 6, "zorder": 5}
    if name == "replica_mean":
        return {
            "color": "tab:gray",
            "linestyle": "--",
            "linewidth": 1.6,
            "marker": "s",
            "markersize": 5,
            "zorder": 4,
        }
    match = _REPLICA.fullmatch(name)
    color = f"C{int(match[1]) % 10}" if match else f"C{index % 10}"
    return {"color": color, "linewidth": 1.2, "marker": "o", "markersize": 4, "alpha": 0.85}


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7.2, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _finish(fig: Figure, ax: Axes) -> Figure:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_loss_by_position(
    curves: Mapping[str, torch.Tensor],
    title: str = "Loss by first-epoch position",
    ylabel: str = "mean loss",
) -> Figure:
    """Plot mean loss per position segment; ``curves`` maps a label to a ``[num_segments]`` tensor.

    Segment 0 holds the samples trained on first. Uses ``matplotlib.figure.Figure`` directly (no
    pyplot state, no GUI backend needed).

    Example:
        >>> fig = plot_loss_by_position({"replica_0": torch.tensor([0.9, 0.7, 0.5])})
        >>> fig.axes[0].get_xlabel()
        'first-epoch position segment (early -> late)'
    """
    fig, ax = _new_axes(title, "first-epoch position segment (early -> late)", ylabel)
    num_segments = 0
    for index, (label, values) in enumerate(curves.items()):
        values = torch.as_tensor(values).float().cpu().reshape(-1)
        num_segments = max(num_segments, values.numel())
        name = label or "model"
        ax.plot(range(values.numel()), values.tolist(), label=name, **model_style(name, index))
    ticks = list(range(num_segments))
    ax.set_xticks(ticks)
    if num_segments:
        ax.set_xticklabels(
            [f"{100 * s // num_segments}%" for s in ticks], fontsize=7 if num_segments > 10 else 9
        )
    return _finish(fig, ax)


def plot_series(
    lines: Mapping[str, Sequence[tuple[int, float]]],
    title: str,
    ylabel: str,
    xlabel: str = "step",
    zero_line: bool = False,
) -> Figure:
    """One line per model of ``(step, value)`` points, e.g. a validation metric per epoch.

    Models logged at the same steps are drawn side by side (shifted by a few percent of the
    step spacing), so that equal steps do not stack their markers on top of each other.
    ``zero_line`` draws y = 0 (e.g. for a correlation).

    Example:
        >>> fig = plot_series({"merged": [(9, 3.2)], "replica_0": [(9, 3.3)]}, "val", "loss")
        >>> [round(float(line.get_xdata()[0]), 2) for line in fig.axes[0].get_lines()]
        [9.08, 8.92]
    """
    fig, ax = _new_axes(title, xlabel, ylabel)
    if zero_line:
        ax.axhline(0.0, color="0.35", linewidth=0.9, linestyle=":", label="ρ = 0", zorder=1)
    steps = sorted({step for points in lines.values() for step, _ in points})
    spacing = min((b - a for a, b in itertools.pairwise(steps)), default=1) or 1
    names = list(lines)
    shift = 0.16 * spacing / max(len(names) - 1, 1)
    for index, name in enumerate(names):
        points = lines[name]
        offset = (_draw_rank(name, names) - (len(names) - 1) / 2) * shift
        xs = [step + offset for step, _ in points]
        ys = [value for _, value in points]
        ax.plot(xs, ys, label=name, **model_style(name, index))
    if steps:
        margin = max(0.5 * spacing, 1)
        ax.set_xlim(steps[0] - margin, steps[-1] + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax)


def _draw_rank(name: str, names: Sequence[str]) -> int:
    """Place of ``name`` from right to left: the merge rightmost, the mean next to it."""
    order = sorted(names, key=lambda n: (n == "merged", n == "replica_mean"), reverse=True)
    return len(names) - 1 - order.index(name)
