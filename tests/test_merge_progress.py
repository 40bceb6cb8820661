"""The file merges report progress in bytes of merged output with its total; the CLI's bar shows
it from the first tensor on, and prints nothing when the merge is refused before it starts."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_selmerge.cli import main as cli
from lightning_selmerge.merging import ParameterSelection, WeightedAverage, merge_checkpoints
from lightning_selmerge.merging.streaming_files import merge_checkpoints_streaming

SHAPES = {"a": (3, 5), "b": (7,), "empty": (0, 4), "steps": (2,)}


def save_replicas(tmp_path: Path, k: int = 3, nan_in: int | None = None) -> list[Path]:
    paths = []
    for replica in range(k):
        gen = torch.Generator().manual_seed(replica)
        tensors = {
            "a": torch.randn(SHAPES["a"], generator=gen),
            "b": torch.randn(SHAPES["b"], generator=gen).to(torch.bfloat16),
            "empty": torch.zeros(SHAPES["empty"]),
            "steps": torch.tensor([7, 1], dtype=torch.int64),
        }
        if replica == nan_in:
            tensors["b"][2] = float("nan")
        paths.append(tmp_path / f"r{replica}.safetensors")
        save_file(tensors, paths[-1])
    return paths


TOTAL = 15 * 4 + 7 * 2 + 0 + 2 * 8  # fp32 a, bf16 b, empty, int64 steps (copied exactly)


@pytest.mark.parametrize("merge", [merge_checkpoints, merge_checkpoints_streaming])
@pytest.mark.parametrize("method", [WeightedAverage(), ParameterSelection(resample=0)])
def test_progress_counts_output_bytes_up_to_the_total(tmp_path: Path, merge, method) -> None:
    calls: list[tuple[int, int]] = []
    merge(
        save_replicas(tmp_path),
        tmp_path / "out",
        method=method,
        progress=lambda *a: calls.append(a),
    )
    assert {total for _, total in calls} == {TOTAL}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == TOTAL


@pytest.mark.parametrize("merge", [merge_checkpoints, merge_checkpoints_streaming])
def test_a_merge_that_starts_over_counts_from_zero_again(tmp_path: Path, merge) -> None:
    calls: list[tuple[int, int]] = []
    paths = save_replicas(tmp_path, k=3, nan_in=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(paths, tmp_path / "out", progress=lambda *a: calls.append(a), nonfinite="drop")
    assert calls[-1] == (TOTAL, TOTAL)
    assert all(0 < done <= total == TOTAL for done, total in calls)


def test_cli_bar_shows_bytes_with_the_total_once(tmp_path: Path, capsys) -> None:
    paths = save_replicas(tmp_path)
    assert cli(["merge", *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("merging") >= 1 and "tensor" not in err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("merging: 100%") and f"{TOTAL}/{TOTAL}" in final.replace(".0", "")


def test_cli_prints_no_bar_when_the_merge_is_refused(tmp_path: Path, capsys) -> None:
    paths = save_replicas(tmp_path)
    assert cli(["merge", *map(str, paths), "--resample", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "merging" not in err and len(err.strip().splitlines()) == 2  # the error, the hint
    assert cli(["merge", *map(str, paths), "--method", "nope", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "merging" not in err and "usage" not in err and len(err.strip().splitlines()) == 2
    assert "'nope'" in err and "selection" in err
