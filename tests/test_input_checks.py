"""Bad inputs found by an adversarial run (issue 23): files that are not safetensors, bad K,
iterable datasets, a loader changed on resume, side files with a single-file base."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from ensemble_support import Net, ensemble_trainer, make_data
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_selmerge.cli import main as cli
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.merging import MergeError, WeightedAverage, merge_checkpoints

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _not_safetensors(path: Path, kind: str) -> None:
    if kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n")
    elif kind == "torch_save":
        torch.save({"w": torch.ones(3)}, path)
    elif kind == "text":
        path.write_text("this is a plain text file, not tensors\n")
    elif kind == "huge_header":
        path.write_bytes((2**64 - 1).to_bytes(8, "little") + b"{}")
    elif kind == "header_past_end":
        path.write_bytes((100).to_bytes(8, "little") + b'{"w": 1}')
    elif kind == "short":
        path.write_bytes(b"\x01\x02")


@pytest.mark.parametrize(
    "kind, match",
    [
        ("lfs", "looks like a Git LFS pointer"),
        ("torch_save", "torch.save"),
        ("text", "not a safetensors file"),
        ("huge_header", "header length 18446744073709551615"),
        ("header_past_end", "header length 100 .* file of 16 bytes"),
        ("short", "not a safetensors file"),
    ],
)
def test_a_file_that_is_not_safetensors_is_named(
    tmp_path: Path, kind: str, match: str, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "r0.safetensors"
    save_file({"w": torch.zeros(3)}, good)
    bad = tmp_path / "r1.safetensors"
    _not_safetensors(bad, kind)
    out = tmp_path / "m"
    with pytest.raises(MergeError, match=match) as raised:
        merge_checkpoints([good, bad], out, method=WeightedAverage())
    assert str(bad) in str(raised.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [good.name, bad.name]
    assert cli(["merge", str(good), str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not out.exists()


def test_an_lfs_pointer_inside_a_model_directory_is_named(tmp_path: Path) -> None:
    for k in range(2):
        (tmp_path / f"r{k}").mkdir()
    save_file({"w": torch.zeros(3)}, tmp_path / "r0" / "model.safetensors")
    _not_safetensors(tmp_path / "r1" / "model.safetensors", "lfs")
    with pytest.raises(MergeError, match="r1/model.safetensors .*Git LFS pointer.*git lfs pull"):
        merge_checkpoints([tmp_path / "r0", tmp_path / "r1"], tmp_path / "m")


@pytest.mark.parametrize(
    "value, match",
    [
        (2.5, r"num_replicas=2.5 is a float: give a whole number"),
        (0, r"num_replicas=0: the number of replicas must be at least 2"),
        (-3, r"num_replicas=-3: the number of replicas must be at least 2"),
        (True, r"num_replicas=True is a bool: give a whole number"),
        (1, r"num_replicas=1 trains a single model"),
        ("4", r"num_replicas='4' is a str: give a whole number"),
    ],
)
def test_num_replicas_is_checked_by_type_and_value(value: object, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        DataOrderEnsemble(num_replicas=value)  # type: ignore[arg-type]


def test_num_replicas_accepts_whole_numbers_of_any_integer_type() -> None:
    assert DataOrderEnsemble(num_replicas=torch.tensor(3).item()).num_replicas == 3
    np = pytest.importorskip("numpy")
    assert DataOrderEnsemble(num_replicas=np.int64(4)).num_replicas == 4


class Stream(IterableDataset):
    def __iter__(self):
        data = make_data()
        yield from (data[i] for i in range(len(data)))


def test_an_iterable_dataset_is_named_as_such() -> None:
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=2), [SelectionMergeCallback()])
    with pytest.raises(MisconfigurationException, match="Stream is an IterableDataset") as err:
        trainer.fit(Net(), DataLoader(Stream(), batch_size=8))
    assert "map-style" in str(err.value) and "got DataLoader" not in str(err.value)


class TwoLoaders(Net):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch_idx, batch["a"][0].tolist()))
        return self.loss(batch["a"]) + self.loss(batch["b"])


@pytest.mark.parametrize("second", [60, 36])  # as many batches as the first, or fewer
def test_several_train_loaders_are_refused_before_training(second: int) -> None:
    """Each loader got its own ensemble sampler: with other lengths the fit crashed with an
    IndexError at a replica's switch, with equal ones both kept the same orders, paired."""
    module = TwoLoaders()
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=2), [SelectionMergeCallback()])
    loaders = {
        "a": DataLoader(make_data(), batch_size=8, shuffle=True),
        "b": DataLoader(make_data(second), batch_size=8, shuffle=True),
    }
    with pytest.raises(MisconfigurationException, match=r"2 train dataloaders \('a', 'b'\)"):
        trainer.fit(module, loaders)
    assert module.seen == []


@pytest.fixture(scope="module")
def mid_epoch_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """K=2, batch_size 8 (8 batches per replica): checkpoints at steps 10 (mid-epoch) and 16."""
    tmp = tmp_path_factory.mktemp("loader_ckpts")
    saver = ModelCheckpoint(dirpath=tmp, every_n_train_steps=2, save_top_k=-1)
    trainer = ensemble_trainer(
        DataOrderEnsemble(num_replicas=2, seed=3), [saver], enable_checkpointing=True
    )
    trainer.fit(Net(), DataLoader(make_data(), batch_size=8, shuffle=True))
    return tmp


@pytest.mark.parametrize(
    "loader, match",
    [
        (
            lambda: DataLoader(make_data(), batch_size=16),
            r"batch_size=8, but this fit's loader has batch_size=16",
        ),
        (
            lambda: DataLoader(Subset(make_data(), range(50)), batch_size=8),
            r"a dataset of 60 samples, but this fit's loader has a dataset of 50 samples",
        ),
        (
            lambda: DataLoader(make_data(), batch_size=8, drop_last=True),
            r"drop_last=False, but this fit's loader has drop_last=True",
        ),
    ],
)
def test_a_mid_epoch_resume_with_another_loader_is_refused(
    mid_epoch_checkpoints: Path, loader, match: str
) -> None:
    ckpt = mid_epoch_checkpoints / "epoch=0-step=10.ckpt"
    module = Net()
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=2, seed=3), max_epochs=2)
    with pytest.raises(MisconfigurationException, match=match) as raised:
        trainer.fit(module, loader(), ckpt_path=str(ckpt))
    assert "epoch=0-step=10.ckpt" in str(raised.value) and "middle of epoch 0" in str(raised.value)
    assert trainer.global_step == 10  # restored, but not one step trained


def test_a_resume_at_an_epoch_end_may_change_the_loader(mid_epoch_checkpoints: Path) -> None:
    ckpt = mid_epoch_checkpoints / "epoch=0-step=16.ckpt"  # the last batch of epoch 0
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=2, seed=3), max_epochs=2)
    trainer.fit(Net(), DataLoader(make_data(), batch_size=16), ckpt_path=str(ckpt))
    assert trainer.global_step == 16 + 2 * 4  # epoch 1: 4 batches of 16 per replica


def test_side_files_come_from_the_first_replica_when_the_base_is_a_single_file(
    tmp_path: Path,
) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    replicas = []
    for k in range(2):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * (k + 1))
        model.save_pretrained(tmp_path / f"r{k}")
        replicas.append(tmp_path / f"r{k}")
    (tmp_path / "r0" / "tokenizer_config.json").write_text("{}\n")
    out = tmp_path / "merged"
    argv = ["merge", *map(str, replicas), "--base", str(tmp_path / "base" / "model.safetensors")]
    assert cli([*argv, "--resample", "1", "--out", str(out), "--quiet"]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    merged = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert merged.config.n_embd == 8
    weights = [transformers.GPT2LMHeadModel.from_pretrained(r).lm_head.weight for r in replicas]
    got = merged.lm_head.weight
    assert bool(((got == weights[0]) | (got == weights[1])).all())  # each element a replica's
