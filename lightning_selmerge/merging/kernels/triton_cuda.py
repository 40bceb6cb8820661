"""Fused CUDA kernels compiled by Triton: one launch per chunk, each replica read once.

The same two entry points as :mod:`.numba_cpu`, with the same bits: selection copies bit
patterns (candidate ``j`` of an element is drawn as :class:`~.draws.DrawSpec` says; the first
whose replica moved from the base wins, else the base); the mean adds the float32-widened
replicas in order into a zeroed float32 sum, divides it by ``K`` with IEEE division
(``tl.math.div_rn``, as torch's CUDA ``div_`` by a 0-dim tensor) and rounds to nearest even.
The replicas are not stacked or copied: their data pointers go to the kernel in one small int64
table (with the hash keys and thresholds), and the kernel casts each entry to a pointer.

A chunk's whole blocks take one launch without masks and, when every pointer is 16-byte aligned
(as a CUDA allocation and a chunk at a multiple of :data:`BLOCK` are), with that said to the
compiler, so that each thread reads and writes 16 bytes at a time; a last partial block takes a
second, masked launch. (A masked load of an unspecialised length, or a pointer of unknown
alignment, compiles to one load per element.)

bfloat16's rounding and both half types' NaN are written out in integer operations, so that
Triton's interpreter (``TRITON_INTERPRET=1``, which the tests run on CPU tensors) computes the
bits a GPU does. A NaN mean is stored as ``0x7FFF`` (a chunk flagged non-finite is never kept:
the merge raises or drops the replica, so no NaN's bits are compared with torch's).

Importing this module without triton works (:mod:`.dispatch` imports it only where triton is
installed; the doctest collection imports every module); its kernels then do not exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .draws import DrawSpec

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - only where triton is not installed
    triton = None
    tl = None

__all__ = ["BLOCK", "mean_chunk", "select_chunk", "selection_table"]

#: Elements per program (one block of every replica per program).
BLOCK = 1024
_NUM_WARPS = 4
_MEAN_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _jit(*runtime_ints: str):
    """``triton.jit``, compiling once for any values of ``runtime_ints`` (Triton would compile
    again for a value of 1 or a multiple of 16: chunk sizes and offsets vary)."""

    def wrap(fn):
        return triton.jit(fn, do_not_specialize=runtime_ints) if triton is not None else fn

    return wrap


@_jit()
def _this_block(first, numel, BLOCK: tl.constexpr):
    """This program's block (``first`` + its id), its elements' int64 offsets, which are inside."""
    pid = tl.program_id(0) + first
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return pid, offs, offs < numel


@_jit()
def _replica_block(table, k, like, offs, inside, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements ``offs`` of the tensor at ``table[k]`` (of ``like``'s type; 0 outside)."""
    pointer = tl.load(table + k).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    if MASKED:
        return tl.load(pointer + offs, mask=inside, other=0)
    return tl.load(pointer + offs)


@_jit()
def _store_block(out, offs, values, inside, MASKED: tl.constexpr):
    if MASKED:
        tl.store(out + offs, values, mask=inside)
    else:
        tl.store(out + offs, values)


@_jit()
def _candidate(
    table,
    key_at,
    j,
    element,
    num_replicas,
    bits,
    thr_at,
    num_thresholds,
    SHARED: tl.constexpr,
    LANE_BITS: tl.constexpr,
):
    """Candidate ``j`` (a replica index, int32) of each element (int64 flat offsets)."""
    PER_WORD: tl.constexpr = 64 // LANE_BITS
    if SHARED:
        key = tl.load(table + key_at).to(tl.uint64, bitcast=True)
    else:
        key = tl.load(table + key_at + j).to(tl.uint64, bitcast=True)
    x = (element // PER_WORD).to(tl.uint64) * 0x9E3779B97F4A7C15 + key  # SplitMix64
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9
    x ^= x >> 27
    x *= 0x94D049BB133111EB
    x ^= x >> 31
    shift = ((element % PER_WORD) * LANE_BITS).to(tl.uint64)
    lane = ((x >> shift) & ((1 << LANE_BITS) - 1)).to(tl.int32)
    if SHARED:
        return (lane >> (LANE_BITS - (j + 1) * bits)) & (num_replicas - 1)
    count = tl.zeros_like(lane)
    for t in range(num_thresholds):
        count += (lane >= tl.load(table + thr_at + t).to(tl.int32)).to(tl.int32)
    return count


@_jit("first", "numel", "start", "num_replicas", "candidates", "bits", "num_thresholds")
def _select_kernel(
    table,
    out,
    flags,
    first,
    numel,
    start,
    num_replicas,
    candidates,
    bits,
    num_thresholds,
    SHARED: tl.constexpr,
    LANE_BITS: tl.constexpr,
    RESAMPLE: tl.constexpr,
    MASK: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Selection of block ``first + program`` into ``out`` (an integer bit view); its NaN/Inf
    flag to ``flags``."""
    pid, offs, inside = _this_block(first, numel, BLOCK)
    element = offs + start
    bits_ty = out.dtype.element_ty
    # table: replicas' pointers, the base's (resample only), keys, thresholds
    key_at = num_replicas
    if RESAMPLE:
        key_at += 1
    thr_at = key_at + candidates
    if SHARED:
        thr_at = key_at + 1
    bad = tl.zeros([BLOCK], tl.int1)
    if RESAMPLE:
        origin = _replica_block(table, num_replicas, out, offs, inside, MASKED, ALIGNED)
        moved = tl.zeros([BLOCK], tl.uint64)
        for k in range(num_replicas):
            x = _replica_block(table, k, out, offs, inside, MASKED, ALIGNED)
            moved |= (x != origin).to(tl.uint64) << k
            if MASK != 0:
                bad |= (x & MASK) == MASK
        # the first candidate that moved; num_replicas (the base) when none did
        choice = tl.zeros([BLOCK], tl.int32) + num_replicas
        for j in range(candidates):
            option = _candidate(
                table,
                key_at,
                j,
                element,
                num_replicas,
                bits,
                thr_at,
                num_thresholds,
                SHARED,
                LANE_BITS,
            )
            hit = ((moved >> option.to(tl.uint64)) & 1) != 0
            choice = tl.where(hit & (choice == num_replicas), option, choice)
        # each element's own replica: a gather, from lines the loop above just read
        source = tl.load(table + choice, mask=inside, other=0).to(tl.pointer_type(bits_ty))
        result = tl.load(source + offs, mask=inside)
    else:
        choice = _candidate(
            table, key_at, 0, element, num_replicas, bits, thr_at, num_thresholds, SHARED, LANE_BITS
        )
        result = tl.zeros([BLOCK], bits_ty)
        for k in range(num_replicas):
            x = _replica_block(table, k, out, offs, inside, MASKED, ALIGNED)
            result = tl.where(choice == k, x, result)
            if MASK != 0:
                bad |= (x & MASK) == MASK
    _store_block(out, offs, result, inside, MASKED)
    tl.store(flags + pid, tl.max(bad.to(tl.int32), axis=0))


@_jit("first", "numel", "num_replicas")
def _mean_kernel(
    table,
    out,
    flags,
    first,
    numel,
    num_replicas,
    KIND: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The mean of block ``first + program`` into ``out`` (int16 bits for bfloat16); its NaN/Inf
    flag to ``flags``."""
    pid, offs, inside = _this_block(first, numel, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    for k in range(num_replicas):
        x = _replica_block(table, k, out, offs, inside, MASKED, ALIGNED)
        if KIND == 0:  # bfloat16 bits: widening is a shift
            x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        total += x.to(tl.float32)
    mean = tl.math.div_rn(total, tl.zeros([BLOCK], tl.float32) + num_replicas)
    # a NaN mean is stored as 0x7FFF, the canonical NaN of bfloat16 and float16
    if KIND == 0:  # to bfloat16, nearest even
        word = mean.to(tl.uint32, bitcast=True)
        rounded = ((word + 0x7FFF + ((word >> 16) & 1)) >> 16).to(tl.int32)
        result = tl.where(mean != mean, 0x7FFF, rounded).to(tl.int16)
        bad = (result & 0x7F80) == 0x7F80
    elif KIND == 1:
        half = mean.to(tl.float16).to(tl.int16, bitcast=True)
        result = tl.where(mean != mean, 0x7FFF, half.to(tl.int32)).to(tl.int16)
        result = result.to(tl.float16, bitcast=True)
        bad = (half & 0x7C00) == 0x7C00
    else:
        result = mean
        bad = (mean.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    _store_block(out, offs, result, inside, MASKED)
    tl.store(flags + pid, tl.max((bad & inside).to(tl.int32), axis=0))


def selection_table(spec: DrawSpec, pointers: Sequence[int]) -> list[int]:
    """The int64 table a selection launch reads: the data pointers of the replicas (and of the
    base, last, when resampling), then the hash keys, then the thresholds (none when shared).

    Example:
        >>> from lightning_selmerge.merging import KeyedRandom, ParameterSelection
        >>> from lightning_selmerge.merging.methods.base import ChunkContext
        >>> ctx = ChunkContext(KeyedRandom(0), "w", start=0)
        >>> spec = DrawSpec.of(ParameterSelection(), ctx, num_replicas=3)
        >>> table = selection_table(spec, [1000, 2000, 3000])
        >>> table[:3], table[3] == ctx.rng.key("w", 0), table[4:]
        ([1000, 2000, 3000], True, [21846, 43691])
    """
    if spec.thresholds is None:
        return [*pointers, spec.keys[0]]
    return [*pointers, *spec.keys, *spec.thresholds]


def _need_triton() -> None:
    if triton is None:
        raise ModuleNotFoundError(
            "the fused CUDA merge kernels need triton, which is not installed: pip install triton"
        )


def _launch_guard(tensor: torch.Tensor):
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()  # Triton's interpreter, on CPU tensors


def _table(entries: Sequence[int], device: torch.device) -> torch.Tensor:
    """The launch's int64 table on ``device``, copied from page-locked memory without waiting
    for the device (freed after the launch: the caching allocators reuse the device block only
    after the kernel, on the same stream, and the host block only after the copy)."""
    table = torch.tensor(list(entries), dtype=torch.int64)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _launch(
    kernel, table: torch.Tensor, inputs: Sequence[torch.Tensor], out: torch.Tensor, *args, **kw
) -> bool:
    """``kernel(table, out, flags, first, numel, *args, **kw)`` over every block of ``out``: the
    whole blocks unmasked, the last partial one masked, ``ALIGNED`` when every pointer is
    16-byte aligned. Whether a block flagged a NaN/Inf."""
    numel = out.numel()
    whole, partial = divmod(numel, BLOCK)
    aligned = all(t.data_ptr() % 16 == 0 for t in (*inputs, out))
    flags = torch.empty(whole + (partial > 0), dtype=torch.int32, device=out.device)
    with _launch_guard(out):
        for first, blocks, masked in ((0, whole, False), (whole, int(partial > 0), True)):
            if blocks:
                kernel[(blocks,)](
                    table,
                    out,
                    flags,
                    first,
                    numel,
                    *args,
                    MASKED=masked,
                    ALIGNED=aligned,
                    BLOCK=BLOCK,
                    num_warps=_NUM_WARPS,
                    enable_fp_fusion=False,  # no multiply-adds to fuse; said so that none ever is
                    **kw,
                )
    return bool(flags.any())


def _check_same_place(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    for tensor in tensors:
        if tensor.device != out.device or tensor.dtype != out.dtype or not tensor.is_contiguous():
            raise ValueError(
                f"the fused CUDA kernels take contiguous chunks of one dtype on one device: got "
                f"{tensor.dtype} on {tensor.device} for {out.dtype} on {out.device}"
            )
        if tensor.numel() != out.numel():
            raise ValueError(f"chunk of {tensor.numel()} elements for {out.numel()}")


def select_chunk(
    spec: DrawSpec,
    replica_bits: list[torch.Tensor],
    base_bits: torch.Tensor | None,
    out_bits: torch.Tensor,
    nonfinite_mask: int,
) -> bool:
    """Selection of contiguous 1-D integer bit views into ``out_bits``; ``False`` when an input
    element has all of ``nonfinite_mask``'s bits set (0: no check)."""
    _need_triton()
    resample = spec.candidates > 1
    num_replicas = len(replica_bits)
    if resample and (base_bits is None or num_replicas > 64):
        raise ValueError(
            f"selection with resampling needs the base and at most 64 replicas "
            f"(got {num_replicas}, base {'missing' if base_bits is None else 'given'})"
        )
    inputs = [*replica_bits, *([base_bits] if resample else [])]
    _check_same_place(inputs, out_bits)
    numel = out_bits.numel()
    if numel == 0:
        return True
    shared = spec.thresholds is None
    table = _table(selection_table(spec, [t.data_ptr() for t in inputs]), out_bits.device)
    flagged = _launch(
        _select_kernel,
        table,
        inputs,
        out_bits,
        spec.start,
        num_replicas,
        spec.candidates,
        spec.bits,
        0 if shared else len(spec.thresholds),
        SHARED=shared,
        LANE_BITS=spec.lane_bits,
        RESAMPLE=resample,
        MASK=nonfinite_mask,
    )
    return not flagged


def mean_chunk(replicas: list[torch.Tensor], out: torch.Tensor) -> bool:
    """The plain mean of contiguous 1-D bfloat16, float16 or float32 tensors into ``out``;
    whether every output element is finite."""
    _need_triton()
    kind = _MEAN_KINDS.get(out.dtype)
    if kind is None:
        raise ValueError(f"no fused CUDA mean for {out.dtype}: use bfloat16, float16 or float32")
    _check_same_place(replicas, out)
    numel = out.numel()
    if numel == 0:
        return True
    if out.dtype == torch.bfloat16:  # the kernel reads and writes bfloat16 as int16 bits
        out = out.view(torch.int16)
    table = _table([r.data_ptr() for r in replicas], out.device)
    return not _launch(_mean_kernel, table, replicas, out, len(replicas), KIND=kind)
