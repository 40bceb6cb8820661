"""Task arithmetic: the base plus scale times the (weighted) summed task vectors."""

import pytest
import torch
from test_method_references import assert_matches_reference

from lightning_selmerge.merging import MergeError, merge_state_dicts
from lightning_selmerge.merging.methods import TaskArithmetic, build_method


def replicas_around(base, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (base.double() + torch.randn(base.shape, generator=gen)).to(base.dtype) for _ in range(k)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "method",
    [
        TaskArithmetic(),
        TaskArithmetic(weights=[1.0, -0.5, 2.0], scale=0.3),
        TaskArithmetic(combine="selection"),
        TaskArithmetic(weights=[1.0, 0.0, 3.0], scale=0.5, combine="selection"),
    ],
)
@pytest.mark.parametrize("chunk_numel", [1, 17, 1000])
def test_task_arithmetic_matches_its_reference(dtype, method, chunk_numel):
    base = torch.randn(300, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_matches_reference(method, base, replicas_around(base, 3), 4, chunk_numel)


def test_sum_is_base_plus_scaled_weighted_task_vectors():
    base = torch.tensor([1.0, 2.0])
    replicas = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 6.0])]  # task vectors (1,0), (0,4)
    method = TaskArithmetic(weights=[2.0, -1.0], scale=0.5)
    merged = merge_state_dicts([{"w": r} for r in replicas], base={"w": base}, method=method)
    assert merged["w"].tolist() == [1.0 + 0.5 * 2.0, 2.0 + 0.5 * -4.0]


def test_selection_draws_one_task_vector_per_element_in_proportion_to_the_weights():
    n = 60_000
    base = torch.zeros(n, dtype=torch.float64)
    replicas = [torch.full((n,), float(k + 1), dtype=torch.float64) for k in range(3)]
    method = TaskArithmetic(weights=[1.0, 0.0, 3.0], scale=0.25, combine="selection")
    merged = merge_state_dicts([{"w": r} for r in replicas], base={"w": base}, method=method)
    # one task vector times sum(w) = 4, times scale 1/4: exactly the drawn replica's value
    values, counts = merged["w"].unique(return_counts=True)
    assert values.tolist() == [1.0, 3.0]
    assert abs(counts[0].item() / n - 0.25) < 0.01


def test_parameters_are_checked_by_name():
    with pytest.raises(MergeError, match="combine must be one of"):
        build_method("task_arithmetic", {"combine": "mean"})
    with pytest.raises(MergeError, match=">= 0"):
        build_method("task_arithmetic", {"weights": [1, -1], "combine": "selection"})
    with pytest.raises(MergeError, match="needs the base"):
        merge_state_dicts([{"w": torch.zeros(2)}] * 2, method=TaskArithmetic())


def test_the_merge_cli_and_rules_take_it_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from lightning_selmerge.cli import main as cli
    from lightning_selmerge.merging import load_rules

    base = torch.randn(4, 3)
    replicas = replicas_around(base, 2)
    paths = [tmp_path / f"r{k}.safetensors" for k in range(2)]
    for path, tensor in zip([*paths, tmp_path / "base.safetensors"], [*replicas, base]):
        save_file({"w": tensor}, path)
    argv = ["merge", *map(str, paths), "--base", str(tmp_path / "base.safetensors")]
    argv += ["--method", "task_arithmetic", "--scale", "0.5", "--out", str(tmp_path / "m")]
    assert cli([*argv, "--quiet"]) == 0
    expected = merge_state_dicts(
        [{"w": r} for r in replicas], base={"w": base}, method=TaskArithmetic(scale=0.5)
    )
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["w"], expected["w"])
    (tmp_path / "rules.yaml").write_text("- {pattern: w, method: task_arithmetic, scale: 0.5}\n")
    assert load_rules(tmp_path / "rules.yaml")[0].method == TaskArithmetic(scale=0.5)
