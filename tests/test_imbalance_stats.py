"""Per-sample losses, segment binning, Spearman and the figure."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_selmerge.imbalance import (
    PositionRecords,
    causal_lm_per_sample_loss,
    plot_loss_by_position,
    position_loss_spearman,
    segment_means,
    sequence_classification_per_sample_loss,
)


def test_causal_lm_per_sample_loss_matches_manual_shifted_ce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100  # prompt tokens
    labels[2, 1:] = -100  # nothing to predict after the shift
    got = causal_lm_per_sample_loss(logits, labels)
    for b in range(2):
        valid = labels[b, 1:] != -100
        want = F.cross_entropy(logits[b, :-1][valid], labels[b, 1:][valid])
        assert torch.allclose(got[b], want, atol=1e-6)
    assert math.isnan(got[2])
    assert causal_lm_per_sample_loss(logits, labels, empty_value=0.0)[2] == 0.0
    # bf16 logits are upcast
    assert causal_lm_per_sample_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_sequence_classification_per_sample_loss() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, -100])
    got = sequence_classification_per_sample_loss(logits, labels)
    assert got[0] < got[1]
    assert torch.allclose(got[:2], F.cross_entropy(logits[:2], labels[:2], reduction="none"))
    assert math.isnan(got[2])


def test_spearman_on_monotone_and_reversed_loss() -> None:
    pos = torch.randperm(300)
    loss = torch.exp(-pos.float() / 50.0)  # strictly decreasing: early = high loss
    assert abs(position_loss_spearman(pos, loss) + 1.0) < 1e-6
    assert abs(position_loss_spearman(pos, -loss) - 1.0) < 1e-6
    noisy = torch.randn(300)
    assert abs(position_loss_spearman(pos, noisy)) < 0.3
    # unseen samples (-1) and NaN losses are skipped
    pos2 = torch.cat([pos, torch.tensor([-1, 5])])
    loss2 = torch.cat([loss, torch.tensor([100.0, float("nan")])])
    assert abs(position_loss_spearman(pos2, loss2) + 1.0) < 1e-6


def test_segment_means_bins_by_fraction_of_epoch() -> None:
    pos = torch.arange(100)
    loss = (pos // 10).float()
    means, counts = segment_means(pos, loss, num_segments=10)
    assert means.tolist() == [float(i) for i in range(10)]
    assert counts.tolist() == [10] * 10
    # a subset binned against the whole epoch length; an empty segment is NaN
    means, counts = segment_means(
        torch.tensor([0, 1, 150]), torch.tensor([1.0, 3.0, 5.0]), num_segments=4, num_positions=200
    )
    assert means[0] == 2.0 and math.isnan(means[1]) and means[3] == 5.0
    assert counts.tolist() == [2, 0, 0, 1]


def test_records_first_positions_take_earliest_and_roundtrip() -> None:
    rec = PositionRecords()
    rec.add(torch.tensor([3, 1, 3]), torch.tensor([0, 1, 2]), epoch=0)  # 3 padded twice
    rec.add(torch.tensor([1, 3]), torch.tensor([0, 1]), epoch=1, loss=torch.tensor([0.1, 0.2]))
    assert rec.first_positions(num_samples=4).tolist() == [-1, 1, -1, 0]
    clone = PositionRecords()
    clone.load_state_dict(rec.state_dict())
    assert len(clone) == 5
    assert torch.equal(clone.table(epoch=1)["loss"], torch.tensor([0.1, 0.2]))


def test_figure_has_one_line_per_curve() -> None:
    fig = plot_loss_by_position(
        {"replica_0": torch.linspace(1, 0, 10), "merged": torch.full((10,), 0.4)}
    )
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["replica_0", "merged"]
    assert len(ax.get_xticks()) == 10
