import threading

import pytest
import torch

from lightning_selmerge.merging import (
    KeyedRandom,
    MergeError,
    MergeRule,
    ParameterSelection,
    WeightedAverage,
    iter_merged_chunks,
    merge_state_dicts,
    merge_tensor,
)
from lightning_selmerge.merging.kernels import KERNELS_ENV
from lightning_selmerge.merging.methods import ChunkContext


def tiny_state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "embed.weight": torch.randn(50, 8, generator=gen),
            "block.ln.weight": torch.ones(8),
            "block.fc.weight": torch.randn(16, 8, generator=gen).bfloat16(),
            "block.fc.bias": torch.zeros(16, dtype=torch.float16),
            "block.bn.num_batches_tracked": torch.tensor(7),
            "mask": torch.tensor([True, False, True]),
        }
    state = {}
    for name, tensor in base.items():
        if tensor.is_floating_point():
            delta = torch.randn(tensor.shape, generator=gen) * 0.1
            keep = torch.rand(tensor.shape, generator=gen) < 0.3
            state[name] = torch.where(keep, tensor, tensor + delta.to(tensor.dtype))
        else:
            state[name] = tensor.clone()
    return state


@pytest.fixture
def states():
    base = tiny_state(0)
    return base, [tiny_state(k + 1, base) for k in range(3)]


@pytest.mark.parametrize(
    "method", [WeightedAverage(), ParameterSelection(), ParameterSelection(resample=3)]
)
def test_result_does_not_depend_on_chunk_size_or_key_order(states, method):
    base, replicas = states
    reference = merge_state_dicts(replicas, base=base, method=method, seed=3)
    for chunk in (1, 7, 64, 10_000):
        again = merge_state_dicts(replicas, base=base, method=method, seed=3, chunk_numel=chunk)
        assert all(torch.equal(reference[n], again[n]) for n in reference)
    reordered = [dict(reversed(list(r.items()))) for r in replicas]
    again = merge_state_dicts(reordered, base=base, method=method, seed=3)
    assert all(torch.equal(reference[n], again[n]) for n in reference)
    other_seed = merge_state_dicts(replicas, base=base, method=method, seed=4)
    if isinstance(method, ParameterSelection):
        assert not torch.equal(reference["embed.weight"], other_seed["embed.weight"])


def test_dtypes_are_preserved_and_integer_buffers_copied(states):
    base, replicas = states
    merged = merge_state_dicts(replicas, base=base, method=ParameterSelection(resample=1))
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype
        assert merged[name].shape == tensor.shape
    assert merged["block.bn.num_batches_tracked"].item() == 7
    assert torch.equal(merged["mask"], base["mask"])


def test_integer_buffers_that_differ_are_refused(states):
    _base, replicas = states
    replicas[2]["block.bn.num_batches_tracked"] = torch.tensor(8)
    with pytest.raises(MergeError, match="num_batches_tracked.*replica 0 and replica 2"):
        merge_state_dicts(replicas)


def test_rules_first_match_wins(states):
    _base, replicas = states
    rules = [MergeRule(r"\.ln\.", WeightedAverage()), MergeRule(r"fc", ParameterSelection())]
    merged = merge_state_dicts(replicas, rules=rules, method=WeightedAverage([1, 0, 0]), seed=0)
    ln = torch.stack([r["block.ln.weight"] for r in replicas]).mean(0)
    torch.testing.assert_close(merged["block.ln.weight"], ln)
    fc = torch.stack([r["block.fc.weight"] for r in replicas])
    assert ((merged["block.fc.weight"] == fc).any(0)).all()
    assert not torch.equal(merged["block.fc.weight"], replicas[0]["block.fc.weight"])
    # the default method (all weight on replica 0) applies to what no rule matches
    assert torch.equal(merged["embed.weight"], replicas[0]["embed.weight"])


def test_tied_weights_are_merged_once_and_stay_tied():
    replicas = []
    for k in range(3):
        embed = torch.randn(10, 4, generator=torch.Generator().manual_seed(k))
        replicas.append({"embed.weight": embed, "lm_head.weight": embed, "other": embed.clone()})
    merged = merge_state_dicts(replicas, seed=1)
    assert merged["embed.weight"] is merged["lm_head.weight"]
    assert merged["other"] is not merged["embed.weight"]
    module = torch.nn.Module()
    module.embed = torch.nn.Embedding(10, 4)
    module.lm_head = torch.nn.Linear(4, 10, bias=False)
    module.lm_head.weight = module.embed.weight
    module.load_state_dict({k: v for k, v in merged.items() if k != "other"})
    assert module.lm_head.weight.data_ptr() == module.embed.weight.data_ptr()


def test_selection_output_elements_come_from_the_replicas(states):
    _base, replicas = states
    merged = merge_state_dicts(replicas, method=ParameterSelection(), seed=0)
    for name in ("embed.weight", "block.fc.weight", "block.fc.bias"):
        stacked = torch.stack([r[name] for r in replicas])
        assert (stacked == merged[name]).any(0).all()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: r.pop("block.ln.weight"), "replica 1 does not have the same tensors.*ln"),
        (lambda r: r.update(extra=torch.zeros(1)), "extra \\['extra'\\]"),
        (lambda r: r.update({"embed.weight": torch.zeros(49, 8)}), "'embed.weight': shape"),
        (
            lambda r: r.update({"block.ln.weight": torch.ones(8).double()}),
            "'block.ln.weight': dtype",
        ),
    ],
)
def test_mismatched_replicas_are_refused_naming_the_tensor(states, mutate, match):
    _base, replicas = states
    mutate(replicas[1])
    with pytest.raises(MergeError, match=match):
        merge_state_dicts(replicas)


def test_resample_without_base_is_refused(states):
    _, replicas = states
    with pytest.raises(MergeError, match="needs the base"):
        merge_state_dicts(replicas, method=ParameterSelection(resample=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "method", [WeightedAverage(), WeightedAverage(weights=[1.0, 2.0]), ParameterSelection()]
)
def test_merged_chunks_stay_valid_after_the_next_chunk(dtype, method):
    """Chunks a caller keeps (e.g. one rank's slices, concatenated) are not reused buffers."""
    replicas = [torch.randn(10).to(dtype), torch.randn(10).to(dtype)]
    whole = merge_tensor("w", replicas, None, method, KeyedRandom(0))
    chunks = list(iter_merged_chunks("w", replicas, None, method, KeyedRandom(0), chunk_numel=3))
    assert torch.equal(torch.cat(chunks), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "method",
    [WeightedAverage(), ParameterSelection(), ParameterSelection(resample=3)],
    ids=["average", "selection", "resample"],
)
def test_chunks_written_into_out_or_one_reused_buffer_equal_new_chunks(dtype, method):
    """``out=`` lands every chunk at its offset; ``reuse_buffer=True`` yields views of one buffer
    that hold the right values when they are yielded."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1000, generator=gen).to(dtype)
    replicas = [torch.where(torch.rand(1000, generator=gen) < 0.4, base, base + 1) for _ in "abcd"]

    def chunks(**kwargs):
        return iter_merged_chunks(
            "w", replicas, base, method, KeyedRandom(5), chunk_numel=300, **kwargs
        )

    fresh = [c.clone() for c in chunks()]
    out = torch.full((1000,), float("nan"), dtype=dtype)
    into_out = list(chunks(out=out))
    assert all(c.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for c in into_out)
    assert torch.equal(out.view(torch.uint8), torch.cat(fresh).view(torch.uint8))
    pointers = set()
    for got, expected in zip(chunks(reuse_buffer=True), fresh, strict=True):
        assert torch.equal(got, expected)
        pointers.add(got.untyped_storage().data_ptr())
    assert len(pointers) == 1


def test_out_of_the_wrong_size_or_dtype_is_refused():
    replicas = [torch.zeros(10), torch.ones(10)]
    for bad in (torch.empty(9), torch.empty(10, dtype=torch.float64)):
        with pytest.raises(
            MergeError, match="out must be a contiguous torch.float32 tensor of 10 elements"
        ):
            list(
                iter_merged_chunks("w", replicas, None, WeightedAverage(), KeyedRandom(0), out=bad)
            )
    with pytest.raises(MergeError, match="out holds 3 torch.float64"):
        WeightedAverage().merge_chunk(
            ChunkContext(KeyedRandom(0), "w", 0),
            replicas,
            None,
            torch.empty(3, dtype=torch.float64),
        )


@pytest.mark.parametrize(
    "method", [WeightedAverage(), ParameterSelection(), ParameterSelection(resample=3)]
)
def test_a_merge_frees_its_scratch_buffers_when_it_returns(states, method, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from lightning_selmerge.merging import merge_checkpoints
    from lightning_selmerge.merging import scratch as scratch_module
    from lightning_selmerge.merging.scratch import held_buffer_bytes, scratch_scope

    # earlier tests' direct merge_chunk calls (outside any scope) keep theirs: start afresh
    monkeypatch.setattr(scratch_module, "_BUFFERS", threading.local())
    # the torch kernels hold the scratch buffers (the fused ones hold none)
    monkeypatch.setenv(KERNELS_ENV, "torch")
    base, replicas = states
    merge_state_dicts(replicas, base=base, method=method, chunk_numel=64)
    assert held_buffer_bytes() == 0
    rng = KeyedRandom(0)
    tensors = [r["embed.weight"] for r in replicas]
    merge_tensor("embed.weight", tensors, base["embed.weight"], method, rng, chunk_numel=64)
    assert held_buffer_bytes() == 0
    paths = []
    for k, state in enumerate([base, *replicas]):
        paths.append(tmp_path / f"{k}.safetensors")
        save_file({n: t for n, t in state.items() if n != "mask"}, paths[-1])
    merge_checkpoints(paths[1:], tmp_path / "out", base=paths[0], method=method)
    assert held_buffer_bytes() == 0
    with scratch_scope():  # an enclosing scope keeps them for reuse until it ends
        merge_state_dicts(replicas, base=base, method=method, chunk_numel=64)
        held = held_buffer_bytes()
        assert held > 0
        merge_state_dicts(replicas, base=base, method=method, chunk_numel=64)
        assert held_buffer_bytes() == held  # reused, not grown
    assert held_buffer_bytes() == 0


@pytest.mark.parametrize("streaming", [False, True])
def test_replicas_tied_unlike_the_first_are_refused(streaming):
    """A merge reads one name of each tie group: a replica whose head is untied (here holding
    other values) would be ignored, and the result would depend on the replicas' order."""
    from lightning_selmerge.merging.streaming import merge_state_dicts_streaming

    tied = torch.zeros(4)
    replicas = [
        {"wte.weight": tied, "lm_head.weight": tied},
        {"wte.weight": torch.ones(4), "lm_head.weight": torch.full((4,), 100.0)},
    ]
    merge = merge_state_dicts_streaming if streaming else merge_state_dicts
    message = "replica 1 ties its tensors unlike replica 0 .lm_head.weight and wte.weight are tied"
    for order in (replicas, replicas[::-1]):
        with pytest.raises(MergeError, match="ties its tensors unlike"):
            merge(order, method=WeightedAverage())
    with pytest.raises(MergeError, match=message):
        merge(replicas, method=WeightedAverage())


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("streaming", [False, True])
def test_parameters_that_require_grad_merge_to_plain_tensors(kernels, streaming):
    """``dict(model.named_parameters())`` as replicas and base: the fused kernels read them
    through numpy (which refuses tensors that require grad), and no output may carry an autograd
    graph back to the replicas."""
    from lightning_selmerge.merging.kernels import use_kernels
    from lightning_selmerge.merging.streaming import merge_state_dicts_streaming

    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 4) for _ in range(3)]
    replicas = [dict(m.named_parameters()) for m in models]
    plain = [{n: t.detach().clone() for n, t in r.items()} for r in replicas]
    merge = merge_state_dicts_streaming if streaming else merge_state_dicts
    for method in (WeightedAverage(), ParameterSelection(resample=1)):
        with use_kernels(kernels):
            got = merge(replicas, method=method, base=replicas[0], seed=3)
            expected = merge(plain, method=method, base=plain[0], seed=3)
        for name, tensor in got.items():
            assert not tensor.requires_grad and tensor.grad_fn is None, name
            assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex32])
def test_complex_buffers_are_copied_and_must_agree(dtype, streaming):
    """A rotary table kept as a complex buffer (Llama's freqs_cis): copied from replica 0, and
    one that differs is named (complex32 raised torch's NotImplementedError before)."""
    import warnings

    from lightning_selmerge.merging.streaming import merge_state_dicts_streaming

    merge = merge_state_dicts_streaming if streaming else merge_state_dicts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        table = torch.polar(torch.ones(6), torch.arange(6.0)).to(dtype)
        replicas = [{"w": torch.full((3,), float(k)), "freqs_cis": table.clone()} for k in range(2)]
        merged = merge(replicas, method=WeightedAverage())
        assert torch.equal(merged["freqs_cis"].view(torch.uint8), table.view(torch.uint8))
        replicas[1]["freqs_cis"] = table * 2
        with pytest.raises(MergeError, match="freqs_cis.*integer, bool and complex tensors"):
            merge(replicas, method=WeightedAverage())


def test_float8_e8m0_scales_are_finite_up_to_their_range():
    """e8m0 (MX block scales) reaches 2**127; float16 (the other float8s' comparison type) does
    not: a finite 2**17 was called +Inf."""
    from lightning_selmerge.merging import all_finite

    scales = torch.tensor([2.0**17, 2.0**-20, 2.0**127]).to(torch.float8_e8m0fnu)
    assert all_finite(scales)
    assert not all_finite(torch.tensor([1.0, float("nan")]).to(torch.float8_e8m0fnu))
    replicas = [{"s": scales}, {"s": scales.clone()}]
    assert torch.equal(merge_state_dicts(replicas)["s"].view(torch.uint8), scales.view(torch.uint8))
