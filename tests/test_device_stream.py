"""The merge streamed through a device's staging buffers gives the in-memory merge's bits.

Without an accelerator the pipeline runs on the CPU device (synchronous copies, no streams), which
exercises its chunking, staging, offsets, plan, ties, NaN/Inf handling and buffer reuse. On a
machine with a CUDA GPU the last test also runs the asynchronous path (a side copy stream, events,
pinned replicas) against the CPU merge's bits.
"""

from __future__ import annotations

import pytest
import torch

from lightning_selmerge.ensemble import replica_merge
from lightning_selmerge.merging import (
    Dare,
    MergeError,
    MergeRule,
    NonFiniteError,
    ParameterSelection,
    TaskArithmetic,
    TiesMerging,
    WeightedAverage,
    device_stream,
    merge_state_dicts,
)
from lightning_selmerge.merging.device_stream import exact_on
from lightning_selmerge.merging.plan import MergePlan

METHODS = [
    ParameterSelection(),
    ParameterSelection(resample=1),
    ParameterSelection(resample=3),
    ParameterSelection(probabilities=[0.1, 0.2, 0.3, 0.4], resample=2),
    WeightedAverage(),
    WeightedAverage(weights=[1.0, 2.0, 0.5, 3.0]),
    TaskArithmetic(weights=[1.0, -0.5, 0.25, 2.0], scale=0.7),
    TiesMerging(density=0.3),
]


def states(
    k: int = 4, shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """K replicas and their base: float32 and bfloat16 tensors, half the elements unmoved, an
    integer buffer and a tied pair."""
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (33, 17), "b.bias": (5,), "c.weight": (1000,)}
    base: dict[str, torch.Tensor] = {
        name: torch.randn(shape, generator=gen) for name, shape in shapes.items()
    }
    base["half.weight"] = torch.randn(211, generator=gen).bfloat16()
    base["steps"] = torch.tensor([7, 8])
    replicas = []
    for _ in range(k):
        state = {}
        for name, tensor in base.items():
            if tensor.is_floating_point():
                moved = torch.rand(tensor.shape, generator=gen) < 0.5
                delta = torch.randn(tensor.shape, generator=gen).to(tensor.dtype)
                state[name] = torch.where(moved, tensor + delta, tensor)
            else:
                state[name] = tensor.clone()
        state["head.weight"] = state["emb.weight"] = torch.randn(9, 4, generator=gen)
        replicas.append(state)
    base["head.weight"] = base["emb.weight"] = torch.zeros(9, 4)
    return replicas, base


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8))


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("chunk_numel", [7, 64, 1 << 20])
def test_streamed_merge_has_the_in_memory_bits(method, chunk_numel):
    replicas, base = states()
    want = merge_state_dicts(replicas, method=method, base=base, seed=5)
    got = merge_state_dicts(
        replicas, method=method, base=base, seed=5, device="cpu", chunk_numel=chunk_numel
    )
    assert_same_bits(got, want)
    assert got["head.weight"] is got["emb.weight"]  # tied tensors stay tied


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("method", [ParameterSelection(), WeightedAverage()], ids=repr)
def test_without_base_and_any_depth(method, depth):
    replicas, _ = states(k=3)
    want = merge_state_dicts(replicas, method=method, seed=1)
    plan = MergePlan.create(method, (), 1, 3)
    labels = [f"replica {k}" for k in range(3)]
    got = device_stream.merge_through_device(
        replicas, labels, [0, 1, 2], plan, None, device="cpu", chunk_numel=50, depth=depth
    )
    assert_same_bits(got, want)


def test_rules_choose_each_tensors_method():
    replicas, base = states()
    rules = [
        MergeRule(r"\.bias$", WeightedAverage()),
        MergeRule(r"^c\.", TaskArithmetic()),
        MergeRule(r"^half\.", Dare(drop_rate=0.3)),
    ]
    kwargs = {"method": ParameterSelection(resample=2), "base": base, "rules": rules, "seed": 3}
    want = merge_state_dicts(replicas, **kwargs)
    assert_same_bits(merge_state_dicts(replicas, device="cpu", chunk_numel=100, **kwargs), want)


def test_missing_base_and_unequal_integer_buffers_are_refused_alike():
    replicas, _ = states()
    for kwargs in ({}, {"device": "cpu"}):
        with pytest.raises(MergeError, match="needs the base"):
            merge_state_dicts(replicas, method=ParameterSelection(resample=1), **kwargs)
    replicas[2]["steps"] = torch.tensor([7, 9])
    for kwargs in ({}, {"device": "cpu"}):
        with pytest.raises(MergeError, match="non-float tensor 'steps'"):
            merge_state_dicts(replicas, **kwargs)


@pytest.mark.parametrize("method", [ParameterSelection(), WeightedAverage()], ids=repr)
def test_nonfinite_is_refused_with_the_same_error_or_dropped_to_the_same_bits(method):
    replicas, base = states()
    replicas[1]["c.weight"] = replicas[1]["c.weight"].clone()
    replicas[1]["c.weight"][901] = float("nan")
    errors = []
    for kwargs in ({}, {"device": "cpu", "chunk_numel": 128}):
        with pytest.raises(NonFiniteError) as caught:
            merge_state_dicts(replicas, method=method, base=base, **kwargs)
        errors.append((str(caught.value), caught.value.replicas))
    assert errors[0] == errors[1]
    assert "replica 1" in errors[0][0] and "901" in errors[0][0]
    with pytest.warns(UserWarning, match="dropped replica 1"):
        want = merge_state_dicts(replicas, method=method, base=base, nonfinite="drop")
    with pytest.warns(UserWarning, match="dropped replica 1"):
        got = merge_state_dicts(
            replicas, method=method, base=base, nonfinite="drop", device="cpu", chunk_numel=99
        )
    assert_same_bits(got, want)


@pytest.mark.parametrize("resample", [0, 1])
def test_staging_buffers_are_reused_whatever_the_number_of_tensors(monkeypatch, resample):
    made: list[int] = []
    original = device_stream._new_staging

    def counting(nbytes: int, device: torch.device) -> torch.Tensor:
        made.append(nbytes)
        return original(nbytes, device)

    monkeypatch.setattr(device_stream, "_new_staging", counting)
    method = ParameterSelection(resample=resample)
    counts = []
    for count in (3, 40):
        shapes = {f"layer{i}.weight": (50 + i,) for i in range(count)}
        replicas, base = states(shapes=shapes)
        made.clear()
        got = merge_state_dicts(replicas, method=method, base=base, device="cpu", chunk_numel=64)
        assert_same_bits(got, merge_state_dicts(replicas, method=method, base=base))
        counts.append(len(made))
    inputs = 4 + (resample > 0)
    assert counts == [2 * inputs, 2 * inputs]  # two staging sets, each one buffer per input
    assert set(made) == {64 * 4}  # one chunk of float32: the largest chunk staged


class _Recorder:
    """A stream or event of the staging pipeline that logs what it is asked to do."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: _Recorder) -> None:
        self.log.append(f"{self.name} waits for {other.name}")

    def wait_event(self, event: _Recorder) -> None:
        self.log.append(f"{self.name} waits for {event.name}")

    def record(self, stream: _Recorder) -> None:
        self.log.append(f"{self.name} recorded on {stream.name}")

    def __enter__(self) -> None:
        self.log.append(f"copies on {self.name}")

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_copy_into_a_new_buffer_waits_for_the_compute_streams_queued_work():
    """A new staging buffer may be memory that kernels still queued on the compute stream read
    (the caching allocator hands back blocks freed there): the copy stream waits for the compute
    stream before writing a set with a new buffer, and only then (reused sets wait for the merge
    that last read them)."""
    log: list[str] = []
    pipeline = device_stream.StagingPipeline("cpu", depth=2, inputs=3, nbytes=64)
    pipeline._async = True  # the CUDA pipeline's ordering, with streams and events that log
    pipeline._compute, pipeline._copy = _Recorder("compute", log), _Recorder("copy", log)
    pipeline._copied = [_Recorder(f"copied[{s}]", log) for s in range(2)]
    pipeline._merged = [_Recorder(f"merged[{s}]", log) for s in range(2)]
    pipeline._merged_recorded = [False, False]

    def stage(slot: int, inputs: int) -> list[str]:
        log.clear()
        pipeline.stage(slot, [torch.arange(4.0)] * inputs)
        pipeline.ready(slot)
        pipeline.release(slot)
        return log[: log.index("copies on copy") + 1]

    assert stage(0, 2) == ["copy waits for compute", "copies on copy"]
    assert stage(1, 2) == ["copy waits for compute", "copies on copy"]
    assert stage(0, 2) == ["copy waits for merged[0]", "copies on copy"]
    # a chunk with a base: set 0 gets a third buffer
    assert stage(0, 3) == ["copy waits for compute", "copy waits for merged[0]", "copies on copy"]
    assert stage(0, 3) == ["copy waits for merged[0]", "copies on copy"]
    assert pipeline.allocations == 5


def test_exact_on_keeps_arithmetic_that_may_round_differently_on_the_cpu():
    assert exact_on(ParameterSelection(probabilities=[0.3, 0.7], resample=2), "cuda")
    assert exact_on(WeightedAverage(), torch.device("cuda", 1))
    for method in (WeightedAverage(weights=[1.0, 2.0]), TaskArithmetic(), TiesMerging(), Dare()):
        assert not exact_on(method, "cuda")
        assert exact_on(method, "cpu")


def test_in_training_merge_on_the_cpu_takes_todays_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CPU in-training merge must not stage chunks")

    monkeypatch.setattr(device_stream, "merge_through_device", refuse)
    replicas, base = states()
    shared = {"steps": base["steps"]}
    want = merge_state_dicts(replicas, base=base, seed=2)
    for device in (None, torch.device("cpu")):
        got = replica_merge.merge_in_memory(
            replicas, base, shared, ParameterSelection(), (), 2, "error", device
        )
        assert_same_bits(got, want)
        assert got["steps"] is base["steps"]


def pinned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in pinned host memory, tied tensors still tied."""
    copies: dict[int, torch.Tensor] = {}
    return {n: copies.setdefault(id(t), t.pin_memory()) for n, t in state.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream and events need CUDA")
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_on_a_gpu_the_staged_merge_has_the_cpu_bits(method):
    """Chunks small enough that copies into a staging set wait on the merge that last read it,
    one to three staging sets, the torch and the fused kernels."""
    from lightning_selmerge.merging.kernels import use_kernels

    replicas, base = states()
    want = merge_state_dicts(replicas, method=method, base=base, seed=5)
    replicas, base = [pinned(r) for r in replicas], pinned(base)
    plan = MergePlan.create(method, (), 5, 4)
    labels = [f"replica {k}" for k in range(4)]
    for kernels in ("torch", "fused"):
        for depth in (1, 2, 3):
            with use_kernels(kernels):
                got = device_stream.merge_through_device(
                    replicas,
                    labels,
                    range(4),
                    plan,
                    base,
                    device="cuda",
                    chunk_numel=96,
                    depth=depth,
                )
            assert all(t.device.type == "cuda" for t in got.values()), (kernels, depth)
            assert got["head.weight"] is got["emb.weight"]
            assert_same_bits({n: t.cpu() for n, t in got.items()}, want)
