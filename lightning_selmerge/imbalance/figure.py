"""Fig. 1 of the paper: mean loss per first-epoch position segment, one curve per model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from matplotlib.figure import Figure

__all__ = ["plot_loss_by_position"]


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
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    num_segments = 0
    for label, values in curves.items():
        values = torch.as_tensor(values).float().cpu().reshape(-1)
        num_segments = max(num_segments, values.numel())
        ax.plot(range(values.numel()), values.tolist(), marker="o", label=label or "model")
    ticks = list(range(num_segments))
    ax.set_xticks(ticks)
    if num_segments:
        ax.set_xticklabels(
            [f"{100 * s // num_segments}%" for s in ticks], fontsize=7 if num_segments > 10 else 9
        )
    ax.set_xlabel("first-epoch position segment (early -> late)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
