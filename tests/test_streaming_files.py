"""The streaming file merge and the epoch-directory merge: same bits, one replica open at a time."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_selmerge.cli import main as cli
from lightning_selmerge.merging import (
    MergeError,
    NonFiniteError,
    ParameterSelection,
    WeightedAverage,
    merge_checkpoints,
    merge_state_dicts,
    streaming_files,
)
from lightning_selmerge.merging.methods import build_method
from lightning_selmerge.merging.safetensors_io import CheckpointReader
from lightning_selmerge.merging.snapshot_records import find_epoch_snapshots
from lightning_selmerge.merging.snapshots import merge_epoch
from lightning_selmerge.merging.streaming_files import merge_checkpoints_streaming


def load_dir(path):
    reader = CheckpointReader(path)
    try:
        return {name: reader.tensor(name).clone() for name in reader.names()}
    finally:
        reader.close()


def synthetic_files(directory, k, dtype=torch.bfloat16, seed=0):
    """A base and K replica .safetensors files of mixed shapes, an integer buffer included."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb": (40, 8), "layers.0.w": (33, 7), "layers.0.b": (7,), "norm": (8,)}
    base = {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}
    base["position_ids"] = torch.arange(5)
    save_file(base, directory / "base.safetensors")
    paths = []
    for r in range(k):
        state = {
            n: torch.where(
                torch.rand(t.shape, generator=gen) < 0.5,
                t,
                torch.randn(t.shape, generator=gen).to(dtype),
            )
            if t.is_floating_point()
            else t
            for n, t in base.items()
        }
        paths.append(directory / f"replica_{r:03d}.safetensors")
        save_file(state, paths[-1])
    return directory / "base.safetensors", paths


def weight_files(directory):
    return sorted(p for p in directory.iterdir() if p.name.startswith("model"))


METHODS = [
    WeightedAverage(),
    WeightedAverage(weights=[1.0 + (i % 3) for i in range(9)]),
    ParameterSelection(),
    ParameterSelection(resample=2),
    ParameterSelection(probabilities=[0.2, 0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.2, 0.1], resample=1),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_file_merge_is_byte_identical_to_merge_checkpoints(tmp_path, method, dtype, monkeypatch):
    base, paths = synthetic_files(tmp_path, 9, dtype)
    expected = merge_checkpoints(
        paths, tmp_path / "all", base=base, method=method, seed=3, max_shard_bytes=600
    )
    open_now, most = set(), [0]
    real = streaming_files.CheckpointReader

    class Counting(real):
        def __init__(self, path):
            super().__init__(path)
            open_now.add(id(self))
            most[0] = max(most[0], len(open_now))

        def close(self):
            open_now.discard(id(self))
            super().close()

    monkeypatch.setattr(streaming_files, "CheckpointReader", Counting)
    got = merge_checkpoints_streaming(
        paths,
        tmp_path / "stream",
        base=base,
        method=method,
        seed=3,
        max_shard_bytes=600,
        chunk_numel=50,
        window_bytes=700,
    )
    # one replica open at a time, and the base beside it when the method reads it
    assert most[0] == (2 if method.needs_base else 1)
    assert [p.name for p in weight_files(got)] == [p.name for p in weight_files(expected)]
    for mine, theirs in zip(weight_files(got), weight_files(expected)):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name
    assert json.loads((got / "selmerge.json").read_text())["streaming"] is True


@pytest.fixture
def gpt2_replicas(tmp_path):
    """A tiny GPT-2 (tied wte/lm_head) and 3 fine-tuned-looking replicas, as models."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    base = GPT2LMHeadModel(config).eval()
    replicas = []
    for _ in range(3):
        model = GPT2LMHeadModel(config).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * (torch.rand_like(p) < 0.7))
        replicas.append(model)
    return base, replicas


@pytest.mark.parametrize("streaming", ["true", "false"])
@pytest.mark.parametrize("resample", [0, 2])
def test_tied_embedding_draws_the_same_in_process_and_from_save_pretrained(
    tmp_path, gpt2_replicas, resample, streaming
):
    """Issue 23 item 11: one canonical name per tie group (the embedding's, kept by the save)."""
    base, replicas = gpt2_replicas
    assert replicas[0].lm_head.weight.data_ptr() == replicas[0].transformer.wte.weight.data_ptr()
    method = ParameterSelection(resample=resample)
    in_process = merge_state_dicts(
        [m.state_dict() for m in replicas], base=base.state_dict(), method=method, seed=9
    )
    base.save_pretrained(tmp_path / "base")
    dirs = []
    for k, model in enumerate(replicas):
        model.save_pretrained(tmp_path / f"r{k}", max_shard_size="30KB")
        dirs.append(str(tmp_path / f"r{k}"))
    assert "lm_head.weight" not in load_dir(tmp_path / "r0")  # save_pretrained drops the alias
    args = ["merge", *dirs, "--seed", "9", "--resample", str(resample), "--quiet"]
    args += ["--base", str(tmp_path / "base"), "--out", str(tmp_path / "out")]
    assert cli([*args, "--streaming", streaming]) == 0
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "out").state_dict()
    for name, tensor in in_process.items():
        assert torch.equal(merged[name], tensor), name
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])


def test_draw_prefix_merges_hf_directories_as_the_wrapping_module_does(tmp_path, gpt2_replicas):
    """Names in an in-process ensemble carry the LightningModule's prefix ('model.')."""
    _base, replicas = gpt2_replicas
    prefixed = [{f"model.{n}": t for n, t in m.state_dict().items()} for m in replicas]
    in_process = merge_state_dicts(prefixed, seed=4)
    for k, model in enumerate(replicas):
        model.save_pretrained(tmp_path / f"r{k}")
    dirs = [str(tmp_path / f"r{k}") for k in range(3)]
    assert (
        cli(
            [
                "merge",
                *dirs,
                "--seed",
                "4",
                "--draw_prefix",
                "model.",
                "--quiet",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    merged = load_dir(tmp_path / "o")
    for name, tensor in merged.items():
        assert torch.equal(tensor, in_process[f"model.{name}"]), name
    # a replica job records the prefix beside its snapshot; the epoch merge then uses it
    epoch = tmp_path / "snapshots" / "epoch_000"
    epoch.mkdir(parents=True)
    for k in range(3):
        (tmp_path / f"r{k}").rename(epoch / f"replica_{k:03d}")
        record = {"num_replicas": 3, "replica": k, "seed": 0, "epoch": 0, "draw_prefix": "model."}
        (epoch / f"replica_{k:03d}" / "selmerge.json").write_text(json.dumps(record))
    out = merge_epoch(epoch, tmp_path / "epoch_merged", seed=4)
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "o" / "model.safetensors"
    ).read_bytes()


def write_epoch(tmp_path, k=4, as_dirs=(), record=None):
    epoch = tmp_path / "snapshots" / "epoch_002"
    epoch.mkdir(parents=True)
    _base, paths = synthetic_files(tmp_path, k)
    for r, path in enumerate(paths):
        if r in as_dirs:
            (epoch / f"replica_{r:03d}").mkdir()
            path.rename(epoch / f"replica_{r:03d}" / "model.safetensors")
            (epoch / f"replica_{r:03d}" / "config.json").write_text("{}")
            if record is not None:
                rec = {"replica": r, **record(r)}
                (epoch / f"replica_{r:03d}" / "selmerge.json").write_text(json.dumps(rec))
        else:
            path.rename(epoch / path.name)
    return epoch, paths


def test_epoch_merge_equals_the_merge_of_its_files(tmp_path):
    epoch, _ = write_epoch(tmp_path, k=4, as_dirs=(1, 2))
    out = merge_epoch(epoch, tmp_path / "out", method=WeightedAverage([1, 2, 3, 4]), seed=1)
    files = [epoch / "replica_000.safetensors", epoch / "replica_001", epoch / "replica_002"]
    files.append(epoch / "replica_003.safetensors")
    expected = merge_checkpoints(files, tmp_path / "ref", method=WeightedAverage([1, 2, 3, 4]))
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    record = json.loads((out / "selmerge.json").read_text())
    assert record["merged_replicas"] == [0, 1, 2, 3] and record["missing_replicas"] == []


def test_missing_replicas_are_named_and_allowed_on_request(tmp_path, capsys):
    epoch, _ = write_epoch(tmp_path, k=5)
    (epoch / "replica_001.safetensors").unlink()
    (epoch / "replica_003.safetensors").unlink()
    with pytest.raises(MergeError, match="missing replica_001, replica_003 of K = 5"):
        find_epoch_snapshots(epoch)
    with pytest.raises(MergeError, match="missing replica_001, replica_003, replica_005 of K = 6"):
        find_epoch_snapshots(epoch, num_replicas=6)
    out = tmp_path / "out"
    args = ["merge", "--epoch_dir", str(epoch), "--out", str(out), "--quiet"]
    assert cli(args) == 2
    assert "missing replica_001, replica_003" in capsys.readouterr().err
    probabilities = "[0.1, 0.2, 0.3, 0.2, 0.2]"
    assert cli([*args, "--allow_missing", "--probabilities", probabilities]) == 0
    assert "(missing: 1, 3)" in capsys.readouterr().out
    kept = [epoch / f"replica_{k:03d}.safetensors" for k in (0, 2, 4)]
    subset = ParameterSelection(probabilities=[0.1, 0.2, 0.3, 0.2, 0.2]).subset([0, 2, 4])
    expected = merge_checkpoints(kept, tmp_path / "ref", method=subset)
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()


def test_records_must_agree(tmp_path):
    epoch, _ = write_epoch(
        tmp_path,
        k=3,
        as_dirs=(0, 1, 2),
        record=lambda r: {"num_replicas": 3, "seed": 7 if r != 2 else 8},
    )
    with pytest.raises(
        MergeError,
        match="disagree on seed: seed=7 in replica_000, replica_001; seed=8 in replica_002",
    ):
        find_epoch_snapshots(epoch)
    (epoch / "replica_002" / "selmerge.json").write_text(
        json.dumps({"replica": 2, "num_replicas": 3, "seed": 7})
    )
    found = find_epoch_snapshots(epoch)
    assert found.num_replicas == 3 and found.seed == 7 and found.missing == []
    with pytest.raises(
        MergeError, match="--num_replicas 4, but the records of .* say num_replicas=3: give"
    ):
        find_epoch_snapshots(epoch, num_replicas=4)
    (epoch / "replica_002" / "selmerge.json").write_text(json.dumps({"replica": 1}))
    with pytest.raises(MergeError, match="says replica 1 but sits in replica_002"):
        find_epoch_snapshots(epoch)


@pytest.mark.parametrize("streaming", [False, True])
def test_snapshots_merged_by_path_in_another_order_are_refused(tmp_path, capsys, streaming):
    """The draws pick replicas by their position in the list: replica snapshots of one run
    listed out of their recorded order would silently give other bits than the epoch merge."""
    epoch, _ = write_epoch(
        tmp_path, k=3, as_dirs=(0, 1, 2), record=lambda r: {"num_replicas": 3, "seed": 7}
    )
    paths = [epoch / f"replica_{k:03d}" for k in range(3)]
    method = ParameterSelection(resample=1)
    merge = merge_checkpoints_streaming if streaming else merge_checkpoints
    listed = [paths[1], paths[0], paths[2]]
    with pytest.raises(MergeError, match="replica 1, replica 0, replica 2.*list them in replica"):
        merge(listed, tmp_path / "o", method=method, base=tmp_path / "base.safetensors")
    with pytest.raises(MergeError, match="replica_000 twice"):
        merge([paths[0], paths[0]], tmp_path / "o", method=method)
    args = ["merge", *map(str, listed), "--out", str(tmp_path / "o"), "--quiet"]
    assert cli([*args, f"--streaming={str(streaming).lower()}"]) == 2
    assert "replica 1, replica 0, replica 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # in order, the path merge gives the epoch merge's bits; a subset in order is merged too
    out = merge(paths, tmp_path / "o", method=method, base=tmp_path / "base.safetensors")
    expected = merge_epoch(epoch, tmp_path / "e", method=method, base=tmp_path / "base.safetensors")
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    assert merge([paths[0], paths[2]], tmp_path / "s").is_dir()
    # snapshots of different runs carry no common order: merged as listed
    (epoch / "replica_000" / "selmerge.json").write_text(json.dumps({"replica": 0, "seed": 8}))
    assert merge([paths[1], paths[0]], tmp_path / "r").is_dir()


@pytest.mark.parametrize(
    ("key", "values"),
    [("initial_fingerprint", ("c20e", "8fc1")), ("fixed_batches", (False, True))],
)
def test_replicas_from_other_initial_weights_or_batches_are_refused(tmp_path, key, values):
    """Jobs of an array started at once each find no snapshot to check against: the merge is
    where replicas trained from other initial weights (another seed_everything) show."""
    epoch, _ = write_epoch(
        tmp_path,
        k=3,
        as_dirs=(0, 1, 2),
        record=lambda r: {"num_replicas": 3, "seed": 0, key: values[r == 1]},
    )
    with pytest.raises(MergeError, match=f"disagree on {key}: .* in replica_001"):
        find_epoch_snapshots(epoch)


def test_a_base_of_other_initial_weights_is_refused(tmp_path):
    record = {"num_replicas": 2, "initial_fingerprint": "a"}
    epoch, _ = write_epoch(tmp_path, k=2, as_dirs=(0, 1), record=lambda r: record)
    (tmp_path / "b").mkdir()
    base, _ = synthetic_files(tmp_path / "b", 1)
    initial = tmp_path / "initial"
    initial.mkdir()
    base.rename(initial / "model.safetensors")
    (initial / "selmerge.json").write_text(json.dumps({"initial_fingerprint": "b"}))
    with pytest.raises(MergeError, match="--base .* initial weights of another run"):
        merge_epoch(epoch, tmp_path / "o", base=initial)
    (initial / "selmerge.json").write_text(json.dumps({"initial_fingerprint": "a"}))
    assert merge_epoch(epoch, tmp_path / "o", base=initial).is_dir()


def test_a_file_snapshots_record_is_checked(tmp_path):
    """A safetensors snapshot carries its record in its metadata (replica jobs of a module that
    is not a Hugging Face model write those): it is checked like a directory's."""
    epoch, _ = write_epoch(tmp_path, k=3)
    for r in range(3):
        path = epoch / f"replica_{r:03d}.safetensors"
        record = {"replica": r, "num_replicas": 3 if r != 2 else 5, "seed": 0}
        save_file(load_dir(path), path, metadata={"selmerge": json.dumps(record)})
    with pytest.raises(MergeError, match="disagree on num_replicas: .*num_replicas=5 in replica"):
        find_epoch_snapshots(epoch)
    path = epoch / "replica_002.safetensors"
    save_file(load_dir(path), path, metadata={"selmerge": json.dumps({"replica": 0})})
    with pytest.raises(MergeError, match="says replica 0 but sits in replica_002"):
        find_epoch_snapshots(epoch)


def test_different_architectures_are_refused_naming_the_difference(tmp_path, capsys):
    epoch, _ = write_epoch(tmp_path, k=3)
    state = load_dir(epoch / "replica_002.safetensors")
    state["norm"] = torch.zeros(9, dtype=torch.bfloat16)
    save_file(state, epoch / "replica_002.safetensors")
    args = ["merge", "--epoch_dir", str(epoch), "--out", str(tmp_path / "o"), "--quiet"]
    assert cli(args) == 2
    assert "tensor 'norm': torch.bfloat16 [9] in replica 2" in capsys.readouterr().err
    del state["norm"]
    save_file(state, epoch / "replica_002.safetensors")
    assert cli(args) == 2
    assert "replica 2" in (err := capsys.readouterr().err) and "missing ['norm']" in err
    assert not (tmp_path / "o").exists()


def test_nonfinite_replica_file_is_refused_or_dropped(tmp_path):
    base, paths = synthetic_files(tmp_path, 4, torch.float32)
    state = load_dir(paths[1])
    state["layers.0.w"][3, 3] = float("inf")
    save_file(state, paths[1])
    for method in (WeightedAverage(), ParameterSelection(resample=1)):
        with pytest.raises(NonFiniteError, match="replica 1") as info:
            merge_checkpoints_streaming(
                paths, tmp_path / "o", base=base, method=method, overwrite=True
            )
        assert info.value.replicas == (1,)
        with pytest.warns(UserWarning, match="dropped replica 1"):
            got = merge_checkpoints_streaming(
                paths, tmp_path / "o", base=base, method=method, nonfinite="drop", overwrite=True
            )
        with pytest.warns(UserWarning, match="dropped replica 1"):
            want = merge_checkpoints(
                paths, tmp_path / "w", base=base, method=method, nonfinite="drop", overwrite=True
            )
        assert (got / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
        dropped = json.loads((got / "selmerge.json").read_text())["dropped_nonfinite"]
        assert dropped == [{"replica": 1, "path": str(paths[1]), "tensor": "layers.0.w"}]


def test_epoch_merge_takes_the_task_vector_methods_and_names_the_way_for_ties(tmp_path, capsys):
    epoch, _ = write_epoch(tmp_path, k=3)
    base = tmp_path / "base.safetensors"  # written by write_epoch's synthetic_files
    args = ["merge", "--epoch_dir", str(epoch), "--base", str(base), "--quiet"]
    files = [epoch / f"replica_{k:03d}.safetensors" for k in range(3)]
    for i, options in enumerate([["--method", "task_arithmetic"], ["--method", "dare"]]):
        assert cli([*args, *options, "--out", str(tmp_path / f"o{i}")]) == 0
        method = build_method(options[1], {})
        expected = merge_checkpoints(files, tmp_path / f"ref{i}", method=method, base=base)
        got = (tmp_path / f"o{i}" / "model.safetensors").read_bytes()
        assert got == (expected / "model.safetensors").read_bytes()
    capsys.readouterr()
    for options in (["--method", "ties"], ["--streaming", "false"]):
        assert cli([*args, *options, "--out", str(tmp_path / "no")]) == 2
        err = capsys.readouterr().err
        assert "merge the snapshots by path" in err and "replica_000" in err
        assert not (tmp_path / "no").exists()
    with pytest.raises(MergeError, match="reads one at a time: merge the snapshots by path"):
        merge_epoch(epoch, tmp_path / "no", method=build_method("ties", {}), base=base)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("method", ["average", "selection"])
def test_cli_merges_all_at_once_unless_asked_to_stream(tmp_path, method):
    """All at once by default, also where the replicas exceed the available memory (mapped
    pages can be dropped and read again; the streaming window cannot: docs/performance.md);
    ``--streaming true`` streams. Same bytes; the record says which ran."""
    _base, paths = synthetic_files(tmp_path, 3)
    args = ["merge", *map(str, paths), "--method", method, "--quiet"]
    assert cli([*args, "--out", str(tmp_path / "default")]) == 0
    assert json.loads((tmp_path / "default" / "selmerge.json").read_text())["streaming"] is False
    assert cli([*args, "--streaming", "true", "--out", str(tmp_path / "streamed")]) == 0
    assert json.loads((tmp_path / "streamed" / "selmerge.json").read_text())["streaming"] is True
    default, streamed = weight_files(tmp_path / "default"), weight_files(tmp_path / "streamed")
    assert [f.read_bytes() for f in default] == [f.read_bytes() for f in streamed]


def test_an_unreadable_file_snapshot_is_a_merge_error(tmp_path):
    epoch, _ = write_epoch(tmp_path, k=2)
    (epoch / "replica_001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MergeError, match="replica_001.safetensors is not a readable"):
        find_epoch_snapshots(epoch)
