"""Synthetic bf16 checkpoints shaped like a small decoder-only transformer, for the merge bench.

A replica is the base plus noise, with a chosen fraction of its elements left bit-identical to
the base (bf16 fine-tuning leaves many elements unmoved); every other element differs from the
base. The tensors are reproducible from the seed and written one file at a time, in a child
process of ``merge_bench.py`` (its parent never imports torch).

    >>> shape = choose_shape(total_gb=0.01, k=4, hidden=None, layers=None)
    >>> shape.tensors()[0]
    ('model.embed_tokens.weight', (2048, 128))
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9
MB = 2**20


@dataclass(frozen=True)
class ModelShape:
    """A small decoder-only transformer: sizes from which the tensor list follows."""

    hidden: int
    layers: int
    vocab: int
    ffn: int
    kv: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        d = self.hidden
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, d))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (d, d)),
                (p + "self_attn.q_proj.bias", (d,)),
                (p + "self_attn.k_proj.weight", (self.kv, d)),
                (p + "self_attn.k_proj.bias", (self.kv,)),
                (p + "self_attn.v_proj.weight", (self.kv, d)),
                (p + "self_attn.v_proj.bias", (self.kv,)),
                (p + "self_attn.o_proj.weight", (d, d)),
                (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (self.ffn, d)),
                (p + "mlp.up_proj.weight", (self.ffn, d)),
                (p + "mlp.down_proj.weight", (d, self.ffn)),
            ]
        out += [("model.norm.weight", (d,)), ("lm_head.weight", (self.vocab, d))]
        return out

    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _shape_for(hidden: int, layers: int | None, target_numel: float) -> ModelShape:
    vocab, ffn, kv = 16 * hidden, _round_to(8 * hidden / 3, 64), max(64, hidden // 4)
    if layers is None:
        fixed = ModelShape(hidden, 0, vocab, ffn, kv).numel()
        per_layer = ModelShape(hidden, 1, vocab, ffn, kv).numel() - fixed
        layers = max(1, round((target_numel - fixed) / per_layer))
    return ModelShape(hidden, layers, vocab, ffn, kv)


def choose_shape(total_gb: float, k: int, hidden: int | None, layers: int | None) -> ModelShape:
    """Hidden size (a multiple of 64) and layer count whose replicas sum to about ``total_gb``."""
    target = total_gb * GB / k / 2  # bf16 elements per replica
    if hidden is None:
        # embed + head = 32 d^2, a layer about 10.5 d^2: with 8 layers about 116 d^2.
        hidden = _round_to(math.sqrt(target / 116), 64)
    return _shape_for(hidden, layers, target)


def _generator(seed: int, *parts: object) -> Any:
    import torch

    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _base_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    import torch

    gen = _generator(seed, "base", name)
    values = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        values = values.mul_(0.05).add_(1.0)
    else:
        values = values.mul_(0.01 if name.endswith("bias") else 0.02)
    return values.to(torch.bfloat16)


def _replica_tensor(name: str, base: Any, k: int, unchanged: float, seed: int) -> Any:
    """Base plus noise; ``unchanged`` of the elements keep the base bits, all others differ."""
    import torch

    gen = _generator(seed, "replica", k, name)
    noise = torch.randn(base.shape, generator=gen).mul_(2e-3)
    moved = base.float().add_(noise).to(torch.bfloat16)
    del noise
    keep = torch.rand(base.shape, generator=gen) < unchanged
    base_bits, bits = base.view(torch.int16), moved.view(torch.int16)
    # Elements meant to move but rounded back to the base value: nudge them by one ulp.
    bits.add_((bits == base_bits) & ~keep)
    torch.where(keep, base_bits, bits, out=bits)
    return moved


@dataclass
class Inputs:
    """The synthetic checkpoints on disk."""

    replicas: list[Path]
    base: Path
    shape: ModelShape
    replica_bytes: int  # the K replica files together
    base_bytes: int
    num_tensors: int


def generate_files(spec: dict[str, Any]) -> float:
    """Write the base and the replicas (runs in a child, so the parent never holds tensors);
    return the fraction of replica 0's elements bit-equal to the base."""
    import torch
    from safetensors.torch import save_file

    shape, seed, unchanged = ModelShape(**spec["shape"]), spec["seed"], spec["unchanged"]
    names = shape.tensors()
    base = {name: _base_tensor(name, dims, seed) for name, dims in names}
    save_file(base, spec["base"], metadata={"format": "pt"})
    same = total = 0
    for i, path in enumerate(spec["replicas"]):
        replica = {name: _replica_tensor(name, base[name], i, unchanged, seed) for name, _ in names}
        if i == 0:
            for name, tensor in replica.items():
                same += int(
                    (
                        tensor.view(-1).view(torch.int16) == base[name].view(-1).view(torch.int16)
                    ).sum()
                )
                total += tensor.numel()
        save_file(replica, path, metadata={"format": "pt"})
        del replica
    return same / total


def warm_page_cache(paths: list[Path]) -> float:
    """Read every file once; return the seconds it took."""
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(16 * MB):
                pass
    return time.perf_counter() - started
