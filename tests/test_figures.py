"""The report's figures: one style per model everywhere, legends off the data, no hidden dots."""

from __future__ import annotations

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lightning_selmerge.imbalance.figure import model_style, plot_loss_by_position, plot_series
from lightning_selmerge.report import signed

NAMES = ["replica_0", "replica_1", "replica_2", "merged", "replica_mean"]


def lines_by_label(fig) -> dict:
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def test_the_merge_looks_the_same_in_every_figure() -> None:
    curves = {name: torch.rand(10) for name in NAMES[:4]}
    series = {name: [(9, 1.0), (19, 2.0)] for name in NAMES}
    for fig in (
        plot_loss_by_position(curves),
        plot_series(series, "validation", "val_loss"),
        plot_series(series, "rho", "rho", zero_line=True),
    ):
        lines = lines_by_label(fig)
        merged = lines["merged"]
        assert (merged.get_color(), merged.get_marker(), merged.get_linewidth()) == (
            "black",
            "D",
            model_style("merged")["linewidth"],
        )
        assert lines["replica_2"].get_color() == "C2"


def test_legend_sits_outside_the_axes() -> None:
    fig = plot_loss_by_position({name: torch.rand(10) for name in NAMES[:4]})
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1


def test_spearman_figure_has_a_zero_line() -> None:
    fig = plot_series({"merged": [(5, -0.2)]}, "rho", "rho", zero_line=True)
    zero = lines_by_label(fig)["ρ = 0"]
    assert list(zero.get_ydata()) == [0.0, 0.0]


def test_models_at_the_same_step_are_drawn_side_by_side() -> None:
    """One epoch: every model has one point at the same step, none hidden behind another."""
    series = {name: [(119, 3.6)] for name in NAMES}
    lines = lines_by_label(plot_series(series, "validation", "val_loss"))
    xs = {name: float(lines[name].get_xdata()[0]) for name in NAMES}
    assert len(set(xs.values())) == len(NAMES)
    assert all(abs(x - 119) < 0.5 for x in xs.values())
    assert xs["merged"] == max(xs.values())  # the merge rightmost, then the mean


def test_signed_numbers_never_print_minus_zero() -> None:
    assert signed(-0.00001) == "0.0000"
    assert signed(0.0) == "0.0000"
    assert signed(-0.00005001) == "-0.0001"
    assert signed(0.25) == "+0.2500"
