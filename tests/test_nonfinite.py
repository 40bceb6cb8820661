"""NaN/Inf in a replica: refused naming the replica and tensor, or dropped on request."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lightning_selmerge.cli import main as cli
from lightning_selmerge.merging import (
    MergeError,
    MergeRule,
    NonFiniteError,
    ParameterSelection,
    WeightedAverage,
    all_finite,
    find_nonfinite,
    merge_checkpoints,
    merge_state_dicts,
)

NAN, INF = float("nan"), float("inf")
METHODS = [
    WeightedAverage(),
    WeightedAverage(weights=[1.0, 2.0, 3.0, 4.0]),
    ParameterSelection(),
    ParameterSelection(resample=2),
    ParameterSelection(probabilities=[0.1, 0.2, 0.3, 0.4]),
]


def replicas_and_base(k: int = 4) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(6, 5, generator=gen),
        "b.weight": torch.randn(300, generator=gen).bfloat16(),
        "steps": torch.tensor(3),
    }
    replicas = []
    for _ in range(k):
        state = {n: t.clone() for n, t in base.items()}
        state["a.weight"] += torch.randn(6, 5, generator=gen) * 0.1
        state["b.weight"] += (torch.randn(300, generator=gen) * 0.1).bfloat16()
        replicas.append(state)
    return replicas, base


def poison(state: dict[str, torch.Tensor], name: str, index: int, value: float) -> None:
    state[name] = state[name].clone()
    state[name].view(-1)[index] = value


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_replica_is_refused_naming_replica_tensor_and_element(method, value) -> None:
    replicas, base = replicas_and_base()
    poison(replicas[2], "b.weight", 250, value)
    with pytest.raises(NonFiniteError, match=r"'b.weight'.*replica 2 \(.*first at flat index 250"):
        # small chunks: the bad element sits in a later chunk than the first
        merge_state_dicts(replicas, base=base, method=method, chunk_numel=64)
    with pytest.raises(NonFiniteError) as caught:
        merge_state_dicts(replicas, base=base, method=method)
    assert caught.value.tensor == "b.weight" and caught.value.replicas == (2,)
    assert "nonfinite='drop'" in str(caught.value) and "--drop_nonfinite" in str(caught.value)


def test_every_bad_replica_of_the_tensor_is_named() -> None:
    replicas, base = replicas_and_base()
    poison(replicas[0], "a.weight", 3, NAN)
    poison(replicas[3], "a.weight", 7, -INF)
    with pytest.raises(NonFiniteError, match=r"replica 0 \(NaN.*index 3\) and replica 3 \(-Inf"):
        merge_state_dicts(replicas, base=base)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_drop_merges_the_others_with_their_weights(method) -> None:
    replicas, base = replicas_and_base()
    poison(replicas[1], "a.weight", 0, NAN)
    with pytest.warns(UserWarning, match=r"merging 3 of 4 replicas: dropped replica 1 .*a.weight"):
        got = merge_state_dicts(replicas, base=base, method=method, seed=5, nonfinite="drop")
    keep = [0, 2, 3]
    expected = merge_state_dicts(
        [replicas[k] for k in keep], base=base, method=method.subset(keep), seed=5
    )
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert all(all_finite(t) for t in got.values())


def test_subset_keeps_and_renormalises_per_replica_parameters() -> None:
    assert WeightedAverage(weights=[1.0, 2.0, 3.0]).subset([0, 2]).weights == [1.0, 3.0]
    assert WeightedAverage().subset([0, 2]) == WeightedAverage()
    selection = ParameterSelection(probabilities=[0.5, 0.25, 0.25], resample=1).subset([1, 2])
    assert selection.probabilities == [0.5, 0.5] and selection.resample == 1
    with pytest.raises(MergeError, match="probability 0"):
        ParameterSelection(probabilities=[1.0, 0.0, 0.0]).subset([1, 2])
    rule = MergeRule("norm", WeightedAverage(weights=[1.0, 2.0, 3.0])).subset([1])
    assert rule.pattern == "norm" and rule.method.weights == [2.0]


def test_drop_with_rules_applies_the_rules_to_the_remaining_replicas() -> None:
    replicas, base = replicas_and_base()
    poison(replicas[3], "b.weight", 9, INF)
    rules = [MergeRule("^a", WeightedAverage(weights=[1.0, 1.0, 2.0, 5.0]))]
    with pytest.warns(UserWarning):
        got = merge_state_dicts(replicas, base=base, rules=rules, nonfinite="drop")
    a = sum(w * replicas[k]["a.weight"] for k, w in enumerate([1.0, 1.0, 2.0])) / 4.0
    torch.testing.assert_close(got["a.weight"], a, rtol=1e-6, atol=1e-6)


def test_drop_refuses_when_fewer_than_two_remain() -> None:
    replicas, base = replicas_and_base(3)
    poison(replicas[0], "a.weight", 1, NAN)
    poison(replicas[2], "b.weight", 1, INF)
    with pytest.raises(MergeError, match=r"leaves 1 replica\(s\) of 3: replica 0 .*replica 2"):
        merge_state_dicts(replicas, base=base, nonfinite="drop")
    with pytest.raises(MergeError, match="nonfinite must be 'error' or 'drop'"):
        merge_state_dicts(replicas, base=base, nonfinite="skip")  # type: ignore[arg-type]


def test_tied_tensors_and_find_nonfinite() -> None:
    tied = torch.randn(4, 3)
    good = {"embed": tied, "head": tied}
    bad_tied = torch.randn(4, 3)
    bad_tied[1, 1] = NAN
    bad = {"embed": bad_tied, "head": bad_tied}
    assert find_nonfinite([good, bad, good]) == {1: "embed"}
    assert find_nonfinite([good, good]) == {}
    with pytest.raises(NonFiniteError, match="'embed'.*replica 1"):
        merge_state_dicts([good, bad, good])


def test_a_view_that_starts_where_another_does_is_still_checked() -> None:
    """``w[:1]`` and ``w`` share a start address but are not tied: both are checked."""
    w = torch.ones(4)
    w[3] = NAN
    ok = {"a_head": torch.ones(1), "b_full": torch.ones(4)}
    assert find_nonfinite([ok, {"a_head": w[:1], "b_full": w}, ok]) == {1: "b_full"}


def test_average_that_overflows_from_finite_replicas_is_refused() -> None:
    huge = [{"w": torch.full((4,), 3e38)}, {"w": torch.full((4,), 3e38)}]
    with pytest.raises(MergeError, match="overflowed torch.float32 .*cast the replicas to float64"):
        merge_state_dicts(huge, method=WeightedAverage())
    assert torch.equal(merge_state_dicts(huge)["w"], huge[0]["w"])  # selection copies


def test_a_float16_task_vector_sum_that_overflows_names_a_wider_dtype_and_the_scale() -> None:
    from lightning_selmerge.merging.methods import TaskArithmetic

    base = {"w": torch.zeros(4, dtype=torch.float16)}
    replicas = [{"w": torch.full((4,), 60000.0, dtype=torch.float16)} for _ in range(2)]
    fix = r"overflowed torch.float16 .*cast the replicas to float32 \(or bfloat16\) .*scale$"
    with pytest.raises(MergeError, match=fix):
        merge_state_dicts(replicas, base=base, method=TaskArithmetic(scale=1.0))
    wide = [{"w": r["w"].float()} for r in replicas]  # the fix works
    merged = merge_state_dicts(
        wide, base={"w": base["w"].float()}, method=TaskArithmetic(scale=1.0)
    )
    assert torch.equal(merged["w"], torch.full((4,), 120000.0))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 5),
    st.integers(1, 200),
    st.data(),
    st.sampled_from([NAN, INF, -INF]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.integers(1, 64),
)
def test_check_finds_any_single_bad_element(k, numel, data, value, dtype, chunk) -> None:
    replicas = [{"w": torch.randn(numel).to(dtype)} for _ in range(k)]
    bad = data.draw(st.integers(0, k - 1))
    index = data.draw(st.integers(0, numel - 1))
    method = data.draw(st.sampled_from([WeightedAverage(), ParameterSelection()]))
    poison(replicas[bad], "w", index, value)
    with pytest.raises(NonFiniteError, match=f"replica {bad} .*first at flat index {index}\\)"):
        merge_state_dicts(replicas, method=method, chunk_numel=chunk)


# -- file merge and CLI ---------------------------------------------------------------------


def save_replicas(tmp_path: Path, bad: dict[int, float]) -> list[Path]:
    replicas, _ = replicas_and_base()
    paths = []
    for k, state in enumerate(replicas):
        if k in bad:
            poison(state, "b.weight", 42, bad[k])
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file(state, paths[-1])
    return paths


def test_file_merge_refuses_naming_the_file_and_writes_nothing(tmp_path: Path) -> None:
    paths = save_replicas(tmp_path, {1: NAN})
    with pytest.raises(NonFiniteError, match=r"'b.weight'.*replica 1 \(.*r1.safetensors\)"):
        merge_checkpoints(paths, tmp_path / "out", chunk_numel=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]


def test_file_merge_drop_equals_merging_the_others(tmp_path: Path) -> None:
    paths = save_replicas(tmp_path, {2: -INF})
    method = ParameterSelection(probabilities=[0.4, 0.3, 0.2, 0.1])
    with pytest.warns(UserWarning, match=r"dropped replica 2 \(.*r2.safetensors\)"):
        out = merge_checkpoints(paths, tmp_path / "out", method=method, nonfinite="drop")
    keep = [0, 1, 3]
    want = merge_checkpoints(
        [paths[k] for k in keep], tmp_path / "want", method=method.subset(keep)
    )
    got, expected = load_file(out / "model.safetensors"), load_file(want / "model.safetensors")
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    provenance = json.loads((out / "selmerge.json").read_text())
    assert provenance["dropped_nonfinite"] == [
        {"replica": 2, "path": str(paths[2]), "tensor": "b.weight"}
    ]
    assert provenance["replicas"] == [str(paths[k]) for k in keep]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_refuses_nonfinite_and_drops_on_request(tmp_path: Path, capsys) -> None:
    paths = save_replicas(tmp_path, {0: NAN})
    args = ["merge", *map(str, paths), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "replica 0" in err and "r0.safetensors" in err and "'b.weight'" in err
    assert "--drop_nonfinite" in err and not (tmp_path / "out").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli([*args, "--drop_nonfinite"]) == 0
    captured = capsys.readouterr()
    assert "dropped replica 0" in captured.err and "merged 3 replicas" in captured.out
    assert all_finite(load_file(tmp_path / "out" / "model.safetensors")["b.weight"])


@pytest.mark.parametrize(
    ("method", "streaming"),
    [
        ("task_arithmetic_selection", False),
        ("task_arithmetic_selection", True),
        ("ties", False),  # TIES needs every replica at once: no streaming form
        ("dare", False),
        ("dare", True),
    ],
)
def test_task_vector_merges_that_overflow_finite_replicas_are_refused(method, streaming):
    """Methods that draw or trim (not every replica added in) check their inputs for NaN/Inf;
    their output can still overflow: refused, not written as Inf."""
    from lightning_selmerge.merging.methods import Dare, TaskArithmetic, TiesMerging
    from lightning_selmerge.merging.streaming import merge_state_dicts_streaming

    methods = {
        "task_arithmetic_selection": TaskArithmetic(combine="selection"),
        "ties": TiesMerging(density=1.0, scale=3.0),
        "dare": Dare(drop_rate=0.9),
    }
    base = {"w": torch.zeros(64, dtype=torch.float16)}
    replicas = [{"w": torch.full((64,), 30000.0, dtype=torch.float16)} for _ in range(4)]
    merge = merge_state_dicts_streaming if streaming else merge_state_dicts
    with pytest.raises(MergeError, match="of finite replicas overflowed torch.float16"):
        merge(replicas, base=base, method=methods[method], seed=0)
