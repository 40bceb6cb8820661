"""Method parameters are refused early and clearly: negative average weights, callback
parameters at construction and against K at setup, rules-file errors naming file and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ensemble_support import Net, ensemble_trainer, make_data
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lightning_selmerge.cli import main as cli
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.merging import (
    MergeError,
    ParameterSelection,
    TaskArithmetic,
    WeightedAverage,
    load_rules,
    merge_checkpoints,
    merge_state_dicts,
)


def files(tmp_path: Path, k: int = 2) -> list[Path]:
    paths = []
    for r in range(k):
        paths.append(tmp_path / f"r{r}.safetensors")
        save_file({"w": torch.randn(6, generator=torch.Generator().manual_seed(r))}, paths[-1])
    return paths


def test_negative_average_weights_are_refused_everywhere(tmp_path, capsys):
    replicas = [{"w": torch.randn(4)}, {"w": torch.randn(4)}]
    with pytest.raises(MergeError, match="negative weight.*'task_arithmetic'"):
        merge_state_dicts(replicas, method=WeightedAverage(weights=[-1.0, 1.001]))
    argv = ["merge", *map(str, files(tmp_path)), "--out", str(tmp_path / "m"), "--quiet"]
    assert cli([*argv, "--method", "average", "--weights", "[-1,1.001]"]) == 2
    assert "negative weight" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    with pytest.raises(MergeError, match="negative weight"):
        SelectionMergeCallback(method="average", weights=[-1, 1, 1.001])
    # the documented opt-in: task arithmetic subtracts a task vector with a negative weight
    base = {"w": torch.zeros(4)}
    negated = merge_state_dicts(replicas, base=base, method=TaskArithmetic(weights=[-1.0, 0.0]))
    assert torch.equal(negated["w"], -replicas[0]["w"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resample": -1}, "resample must be an integer >= 0"),
        ({"method": "average", "weights": [1.0, float("nan")]}, "finite"),
        ({"method": "selection", "probabilities": [0.5, 0.6]}, "sum to 1"),
        ({"method": "average", "resample": 1}, "takes weights, not resample"),
        ({"method": "no_such_method"}, "unknown merge method 'no_such_method'"),
        ({"method": ParameterSelection(), "resample": 1}, "pass them to the method itself"),
        ({"method": ParameterSelection(resample=-2)}, "resample must be an integer >= 0"),
    ],
)
def test_callback_parameters_are_checked_at_construction(kwargs, match):
    with pytest.raises(MergeError, match=match):
        SelectionMergeCallback(**kwargs)


@pytest.mark.parametrize(
    "callback, match",
    [
        (SelectionMergeCallback(method="average", weights=[1.0, 2.0]), "2 weights for 3"),
        (SelectionMergeCallback(probabilities=[0.5, 0.5]), "2 probabilities for 3"),
    ],
)
def test_callback_parameters_are_checked_against_k_before_training(callback, match):
    module = Net()
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=3), [callback])
    with pytest.raises(MisconfigurationException, match=f"num_replicas=3.*{match}"):
        trainer.fit(module, DataLoader(make_data(), batch_size=8))
    assert module.seen == []  # refused at setup: no training step ran


def test_a_method_object_is_used_as_given():
    method = ParameterSelection(resample=2)
    assert SelectionMergeCallback(method=method).method is method


def test_rules_file_errors_found_against_k_name_the_file_and_the_rule(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- {pattern: x, method: selection}\n- {pattern: w, method: average, weights: [1, 2, 3]}\n"
    )
    paths = files(tmp_path)
    with pytest.raises(MergeError, match=r"rules.yaml, rule 2 .*3 weights for 2 replicas"):
        merge_checkpoints(paths, tmp_path / "m", rules=load_rules(rules))
    argv = ["merge", *map(str, paths), "--out", str(tmp_path / "m"), "--rules", str(rules)]
    assert cli([*argv, "--method", "average", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(rules) in err and "rule 2" in err and "3 weights for 2 replicas" in err
    assert not (tmp_path / "m").exists()


def test_a_lightning_cli_yaml_gives_the_callback_a_method_by_class_path():
    """As LightningCLI reads ``trainer.callbacks``: jsonargparse builds the method object."""
    from jsonargparse import ArgumentParser

    from lightning_selmerge.merging import TiesMerging

    parser = ArgumentParser()
    parser.add_class_arguments(SelectionMergeCallback, "callback")
    method = {"class_path": "lightning_selmerge.merging.TiesMerging"}
    method["init_args"] = {"density": 0.3, "combine": "selection"}
    config = parser.parse_object({"callback": {"method": method}})
    callback = parser.instantiate_classes(config)["callback"]
    assert callback.method == TiesMerging(density=0.3, combine="selection")
    named = parser.instantiate_classes(parser.parse_object({"callback": {"method": "average"}}))
    assert named["callback"].method == WeightedAverage()
