import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_selmerge.cli import main as cli
from lightning_selmerge.merging import (
    MergeError,
    MergeRule,
    ParameterSelection,
    WeightedAverage,
    merge_checkpoints,
    merge_state_dicts,
)
from lightning_selmerge.merging.safetensors_io import CheckpointReader


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def hf_replicas(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    dirs = []
    for k in range(3):
        model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * (torch.rand_like(p) < 0.7))
        # sharded on purpose: HF writes the index json
        model.save_pretrained(tmp_path / f"r{k}", max_shard_size="20KB")
        dirs.append(tmp_path / f"r{k}")
    return tmp_path / "base", dirs


def load_dir(path):
    reader = CheckpointReader(path)
    return {name: reader.tensor(name).clone() for name in reader.names()}


@pytest.mark.parametrize(
    "method", [WeightedAverage(), ParameterSelection(), ParameterSelection(resample=2)]
)
def test_file_merge_equals_state_dict_merge_and_loads_with_from_pretrained(
    tmp_path, hf_replicas, method
):
    base, dirs = hf_replicas
    assert (dirs[0] / "model.safetensors.index.json").exists()
    (base / "tokenizer_config.json").write_text("{}")
    (base / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')  # not ours
    out = merge_checkpoints(
        dirs,
        tmp_path / "merged",
        base=base,
        method=method,
        seed=5,
        max_shard_bytes=30_000,
        chunk_numel=333,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    assert not (out / "pytorch_model.bin.index.json").exists()
    expected = merge_state_dicts(
        [load_dir(d) for d in dirs], base=load_dir(base), method=method, seed=5
    )
    got = load_dir(out)
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in got)
    model = GPT2LMHeadModel.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        if name in got:
            assert torch.equal(tensor, got[name]), name
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_single_safetensors_files_and_rules(tmp_path):
    files = []
    for k in range(2):
        path = tmp_path / f"r{k}.safetensors"
        save_file(
            {
                "ln.weight": torch.full((4,), float(k)),
                "w": torch.full((1000,), float(k)),
                "step": torch.tensor([3]),
            },
            path,
        )
        files.append(path)
    out = merge_checkpoints(
        files, tmp_path / "out", rules=[MergeRule("ln", WeightedAverage())], seed=0
    )
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["ln.weight"], torch.full((4,), 0.5))
    assert set(merged["w"].tolist()) == {0.0, 1.0}
    assert merged["step"].tolist() == [3]


def test_existing_output_is_refused_unless_overwrite(tmp_path, hf_replicas):
    _base, dirs = hf_replicas
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoints(dirs, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_checkpoints(dirs, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "r0", "r1", "r2"]


def mismatched(tmp_path, change):
    paths = []
    for k in range(2):
        tensors = {"a": torch.zeros(4, 4), "b": torch.zeros(3)}
        if k == 1:
            change(tensors)
        path = tmp_path / f"m{k}.safetensors"
        save_file(tensors, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t.pop("b"), "does not have the same tensors"),
        (lambda t: t.update(a=torch.zeros(4, 5)), "tensor 'a'"),
        (lambda t: t.update(a=torch.zeros(4, 4, dtype=torch.float16)), "tensor 'a'.*dtype"),
    ],
)
def test_mismatched_files_are_refused_and_write_nothing(tmp_path, change, match):
    paths = mismatched(tmp_path, change)
    with pytest.raises(MergeError, match=match):
        merge_checkpoints(paths, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors"]


def test_bad_inputs_are_named(tmp_path, hf_replicas):
    _base, dirs = hf_replicas
    with pytest.raises(MergeError, match="does not exist"):
        merge_checkpoints([dirs[0], tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="no safetensors weights"):
        merge_checkpoints([dirs[0], tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(MergeError, match="needs the base"):
        merge_checkpoints(dirs, tmp_path / "out", method=ParameterSelection(resample=1))
    with pytest.raises(MergeError, match="at least 2 replicas"):
        merge_checkpoints(dirs[:1], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_merge_leaves_no_partial_output(tmp_path, hf_replicas, monkeypatch):
    _base, dirs = hf_replicas
    from lightning_selmerge.merging import safetensors_io

    calls = {"n": 0}
    real_write = safetensors_io.ShardedSafetensorsWriter.write

    def failing_write(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_write(self, name, chunk)

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        merge_checkpoints(dirs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_cli_merge(tmp_path, hf_replicas, capsys):
    base, dirs = hf_replicas
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- pattern: 'ln_'\n  method: average\n- pattern: '.'\n  method: selection\n  resample: 1\n"
    )
    args = [
        "merge",
        *map(str, dirs),
        "--base",
        str(base),
        "--rules",
        str(rules),
        "--seed",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert cli(args) == 0
    merged = load_dir(tmp_path / "out")
    expected = merge_state_dicts(
        [load_dir(d) for d in dirs],
        base=load_dir(base),
        seed=2,
        rules=[MergeRule("ln_", WeightedAverage()), MergeRule(".", ParameterSelection(resample=1))],
    )
    assert all(torch.equal(merged[n], expected[n]) for n in merged)
    assert cli(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        cli(
            [
                "merge",
                *map(str, dirs),
                "--method",
                "average",
                "--weights",
                "[1, 2]",
                "--out",
                str(tmp_path / "o2"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "2 weights for 3 replicas" in capsys.readouterr().err


def test_empty_tensors_anywhere_in_the_order_and_float8(tmp_path):
    """Empty tensors first, last and right after non-empty ones, in several shards; float8."""
    gen = torch.Generator().manual_seed(0)
    names = ["a_empty", "b", "c_empty", "d_empty", "e", "f8", "g_empty"]
    paths = []
    for k in range(3):
        state = {}
        for name in names:
            if name.endswith("empty"):
                state[name] = torch.zeros(0, 4)
            elif name == "f8":
                state[name] = torch.randn(6, generator=gen).to(torch.float8_e4m3fn)
            else:
                state[name] = torch.randn(5, 3, generator=gen)
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file(state, paths[-1])
    loaded = [load_file(p) for p in paths]
    for method in (WeightedAverage(), ParameterSelection()):
        out = merge_checkpoints(
            paths, tmp_path / "m", method=method, max_shard_bytes=40, chunk_numel=4, overwrite=True
        )
        merged = load_dir(out)
        expected = merge_state_dicts(loaded, method=method)
        assert set(merged) == set(names)
        for name in names:
            assert merged[name].shape == expected[name].shape
            assert torch.equal(merged[name].view(torch.uint8), expected[name].view(torch.uint8))


def _corrupt_header(path, edit):
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate", "truncated or corrupt"),
        ("offsets", "needs 60 bytes but its data_offsets span 56"),
        ("no_dtype", "malformed header entry"),
        ("shape", "malformed header entry"),
        ("dtype_list", "malformed header entry"),
    ],
)
def test_corrupt_safetensors_files_are_named(tmp_path, damage, match):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"r{k}.safetensors")
        save_file({"w": torch.full((3, 5), float(k)), "z": torch.ones(2)}, paths[-1])
    bad = paths[1]
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:-10])
    elif damage == "offsets":
        _corrupt_header(bad, lambda h: h["w"].update(data_offsets=[0, 56]))
    elif damage == "no_dtype":
        _corrupt_header(bad, lambda h: h["w"].pop("dtype"))
    elif damage == "dtype_list":
        _corrupt_header(bad, lambda h: h["w"].update(dtype=["F32"]))
    else:
        _corrupt_header(bad, lambda h: h["w"].update(shape=[3, -5]))
    with pytest.raises(MergeError, match=match) as raised:
        merge_checkpoints(paths, tmp_path / "out", method=WeightedAverage())
    assert str(bad) in str(raised.value)
    if damage != "truncate":
        assert "tensor 'w'" in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_the_outputs_other_files_describe_the_replicas(tmp_path, hf_replicas, streaming):
    """Config and the like from the first replica (it describes the merged weights: here a vocab
    the fine-tune grew), each file it lacks from the base (a tokenizer), Sentence-Transformers
    folders copied, a folder holding weights named as not merged."""
    from lightning_selmerge.merging import merge_checkpoints_streaming

    base, dirs = hf_replicas
    for replica in dirs:
        config = json.loads((replica / "config.json").read_text())
        (replica / "config.json").write_text(json.dumps({**config, "note": "fine-tuned"}))
        (replica / "1_Pooling").mkdir()
        (replica / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (base / "tokenizer.json").write_text("{}")
    (dirs[0] / "2_Dense").mkdir()
    save_file({"w": torch.zeros(2)}, dirs[0] / "2_Dense" / "model.safetensors")
    merge = merge_checkpoints_streaming if streaming else merge_checkpoints
    (dirs[0] / "checkpoint-500").mkdir()  # a trainer's output directory: not the model's
    (dirs[0] / "checkpoint-500" / "trainer_state.json").write_text("{}")
    with pytest.warns(UserWarning, match="2_Dense holds weights .* this merge does not merge"):
        out = merge(dirs, tmp_path / "m", method=ParameterSelection(resample=1), base=base)
    assert not (out / "2_Dense").exists() and not (out / "checkpoint-500").exists()
    assert json.loads((out / "config.json").read_text())["note"] == "fine-tuned"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "1_Pooling" / "config.json").is_file()
    assert GPT2LMHeadModel.from_pretrained(out).config.note == "fine-tuned"


def test_tokenizer_files_come_as_one_set(tmp_path, hf_replicas):
    """A replica's tokenizer is taken whole: the base's older special_tokens_map.json would
    contradict the replica's added tokens."""
    base, dirs = hf_replicas
    (base / "tokenizer.json").write_text('{"base": true}')
    (base / "special_tokens_map.json").write_text('{"pad_token": "<base>"}')
    (base / "generation_config.json").write_text("{}")
    for replica in dirs:
        (replica / "tokenizer.json").write_text('{"added": ["<tool>"]}')
    out = merge_checkpoints(dirs, tmp_path / "m", method=ParameterSelection(), base=base)
    assert (out / "tokenizer.json").read_text() == '{"added": ["<tool>"]}'
    assert not (out / "special_tokens_map.json").exists()
    assert (out / "generation_config.json").is_file()  # other files still fall back to the base


@pytest.mark.parametrize(
    ("holds", "hint"),
    [
        ("adapter_model.safetensors", "it is a PEFT adapter: fold each replica's adapter"),
        ("pytorch_model.bin", "save it again with safetensors"),
    ],
)
def test_a_directory_of_another_format_names_what_to_do(tmp_path, holds, hint):
    for k in range(2):
        (tmp_path / f"r{k}").mkdir()
        (tmp_path / f"r{k}" / holds).write_bytes(b"\0" * 8)
    with pytest.raises(MergeError, match=hint):
        merge_checkpoints([tmp_path / "r0", tmp_path / "r1"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_a_rule_matching_no_tensor_is_named(tmp_path, hf_replicas, streaming):
    from lightning_selmerge.merging import MergeRule, merge_checkpoints_streaming

    _, dirs = hf_replicas
    merge = merge_checkpoints_streaming if streaming else merge_checkpoints
    rules = [MergeRule("layernorm", WeightedAverage()), MergeRule("ln_", WeightedAverage())]
    with pytest.warns(UserWarning, match="rule 1 .pattern 'layernorm'. matches no tensor"):
        merge(dirs, tmp_path / "m", method=ParameterSelection(), rules=rules)
    assert (tmp_path / "m").is_dir()


def _sharded(directory, shards, weight_map):
    directory.mkdir()
    for file, tensors in shards.items():
        save_file(tensors, directory / file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.mark.parametrize(
    "weight_map, match",
    [
        ([], "its weight_map must map tensor names to shard files"),
        (None, "its weight_map must map tensor names to shard files"),
        ({"w": 5}, "its weight_map must map tensor names to shard files"),
        ({"w": "a.safetensors", "v": "a.safetensors"}, "puts tensor 'v' in a.safetensors"),
    ],
)
def test_malformed_or_stale_indexes_are_named(tmp_path, weight_map, match):
    shards = {"a.safetensors": {"w": torch.ones(2)}}
    directory = _sharded(tmp_path / "r", shards, weight_map)
    with pytest.raises(MergeError, match=match):
        CheckpointReader(directory)


def test_the_index_says_which_shard_holds_a_tensor(tmp_path):
    """A tensor left in two shards (a stale shard): the one the index names is read."""
    shards = {
        "a.safetensors": {"w": torch.full((2,), 7.0)},
        "b.safetensors": {"w": torch.ones(2), "v": torch.zeros(1)},
    }
    directory = _sharded(tmp_path / "r", shards, {"w": "a.safetensors", "v": "b.safetensors"})
    reader = CheckpointReader(directory)
    try:
        assert torch.equal(reader.tensor("w"), torch.full((2,), 7.0))
    finally:
        reader.close()
