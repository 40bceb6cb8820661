"""Bad inputs not covered elsewhere (the full table is in docs/reliability.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from ensemble_support import Net, ensemble_trainer, make_data
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

from lightning_selmerge.cli import main as cli
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def fit_on(loader: DataLoader, k: int = 2, **trainer_kwargs) -> tuple[Net, Trainer]:
    module = Net()
    trainer = ensemble_trainer(
        DataOrderEnsemble(num_replicas=k, seed=3),
        [SelectionMergeCallback(seed=1)],
        **trainer_kwargs,
    )
    trainer.fit(module, loader)
    return module, trainer


def test_dataset_smaller_than_a_batch_trains_one_partial_batch_per_replica() -> None:
    """Each replica takes one optimizer step on one partial batch holding all 5 samples.

    The two replicas' steps see the same set of samples (only their order differs), so their
    weights may agree to the bit: Adam's first step is ``lr * sign(grad)`` up to rounding. What
    must hold is that each replica trained, on exactly its one batch, and that the merge ran.
    """
    start = {n: t.clone() for n, t in Net().state_dict().items()}
    module, trainer = fit_on(DataLoader(Subset(make_data(), range(5)), batch_size=8))
    strategy, (merge,) = trainer.strategy, trainer.callbacks[:1]
    assert isinstance(merge, SelectionMergeCallback) and merge.merged_state is not None
    assert strategy.batches_per_replica == 1 and trainer.global_step == 2
    assert [(batch_idx, sorted(samples)) for _, batch_idx, samples in module.seen] == [
        (0, [0, 1, 2, 3, 4]),
        (1, [0, 1, 2, 3, 4]),
    ]
    replicas = strategy.replica_states()
    for replica in replicas:
        assert not torch.equal(replica["net.0.weight"], start["net.0.weight"])
    merged = merge.merged_state["net.0.weight"]
    assert torch.equal(module.state_dict()["net.0.weight"], merged)
    chosen_from = torch.stack([merged == replica["net.0.weight"] for replica in replicas])
    assert chosen_from.any(dim=0).all()  # every merged element is one replica's element


def test_dataset_smaller_than_a_batch_with_drop_last_is_refused() -> None:
    loader = DataLoader(Subset(make_data(), range(5)), batch_size=8, drop_last=True)
    with pytest.raises(MisconfigurationException, match="each replica gets 0 training batches"):
        fit_on(loader)


def test_limit_train_batches_beyond_a_replica_keeps_whole_replicas() -> None:
    """An int limit applies per replica; more than a replica has gives each its full pass."""
    _, trainer = fit_on(DataLoader(make_data(), batch_size=8), k=3, limit_train_batches=100)
    assert trainer.strategy.batches_per_replica == 8 and trainer.global_step == 24
    assert trainer.limit_train_batches == 100


def test_cli_refuses_one_replica_and_replaces_only_with_overwrite(tmp_path: Path, capsys) -> None:
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file({"w": torch.full((4,), float(k))}, paths[-1])
    out = tmp_path / "out"
    assert cli(["merge", str(paths[0]), "--out", str(out), "--quiet"]) == 2
    assert "at least 2 replicas" in capsys.readouterr().err and not out.exists()

    out.mkdir()
    (out / "mine.txt").write_text("keep")
    average = ["merge", *map(str, paths), "--method", "average", "--out", str(out), "--quiet"]
    assert cli(average) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "mine.txt").read_text() == "keep"
    assert cli([*average, "--overwrite"]) == 0
    assert not (out / "mine.txt").exists()
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.full((4,), 0.5))


@pytest.mark.parametrize(
    "text, match",
    [
        ("- average\n", "rule 1: merge rule 'average' must be a mapping"),
        ("- {pattern: ln, method: average, weights: 2}\n", "rule 1: .*weights must be a list"),
        ("- {pattern: ., method: selection, probabilities: [a, b]}\n", "probabilities must be"),
        (
            "- {pattern: ln, method: average}\n- {pattern: ., method: selection, resample: -1}\n",
            "rule 2: .*resample must be an integer >= 0",
        ),
    ],
)
def test_bad_rules_files_are_named_by_the_merge_cli(
    tmp_path: Path, text: str, match: str, capsys: pytest.CaptureFixture
) -> None:
    from lightning_selmerge.merging import MergeError, load_rules

    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    with pytest.raises(MergeError, match=match):
        load_rules(rules)
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file({"w": torch.full((3,), float(k))}, paths[-1])
    argv = ["merge", *map(str, paths), "--out", str(tmp_path / "m"), "--rules", str(rules)]
    assert cli(argv) == 2
    assert "rule" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
