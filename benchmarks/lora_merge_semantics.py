"""What merging LoRA adapters element-wise does to the effective update ``scale * B @ A``.

Trains K replicas of a tiny GPT-2 with PEFT LoRA adapters (``DataOrderEnsemble``), then merges
them four ways and compares each merged layer's delta with the mean of the replicas' deltas
(``mean_k scale * B_k @ A_k``, what averaging full fine-tuned weights would give):

* ``select A,B``: selection on the adapter matrices (what the callback does to a LoRA module);
* ``average A,B``: the average of A and of B, separately;
* ``select folded``: selection on the folded weights ``W0 + scale * B_k @ A_k`` (each element
  of the merged delta is one replica's: the paper's selection, applied to the effective weights);
* ``average folded``: the average of the folded weights (= the mean delta, as a check).

Also the training loss of each merged model and of the replicas. CPU, about 20 s::

    python benchmarks/lora_merge_semantics.py --replicas 4 --epochs 2
"""

from __future__ import annotations

import argparse
import warnings

import peft
import torch
import transformers
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.merging import ParameterSelection, WeightedAverage, merge_state_dicts

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class LoraLM(LightningModule):
    def __init__(self, rank: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4
        )
        base = transformers.GPT2LMHeadModel(config)
        lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_fc"])
        self.model = peft.get_peft_model(base, lora)
        self.model.train()

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def data(n: int = 256, length: int = 24) -> torch.Tensor:
    """Token sequences with structure to learn: each token is the previous one plus 1..3."""
    gen = torch.Generator().manual_seed(1)
    steps = torch.randint(1, 4, (n, length), generator=gen)
    start = torch.randint(0, 64, (n, 1), generator=gen)
    return (start + steps.cumsum(1)) % 64


def lora_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes of the LoRA-wrapped layers (``...c_attn``)."""
    return sorted({n.split(".lora_A.")[0] for n in state if ".lora_A." in n})


def delta(state: dict[str, torch.Tensor], layer: str, scale: float) -> torch.Tensor:
    b = state[f"{layer}.lora_B.default.weight"]
    a = state[f"{layer}.lora_A.default.weight"]
    return scale * (b @ a)


def folded(state: dict[str, torch.Tensor], layers: list[str], scale: float):
    """``{layer: W0 + scale * B @ A}`` (in the orientation of B @ A)."""
    out = {}
    for layer in layers:
        weight = state[f"{layer}.base_layer.weight"]
        d = delta(state, layer, scale)
        out[layer] = (weight.T if weight.shape != d.shape else weight) + d
    return out


@torch.no_grad()
def loss_with_deltas(module: LoraLM, deltas: dict[str, torch.Tensor], tokens) -> float:
    """Training loss of the base model plus the given effective deltas (adapters switched off)."""
    model = module.model
    state = {n: t.clone() for n, t in model.state_dict().items()}
    try:
        for layer, d in deltas.items():
            name = layer.removeprefix("model.") + ".base_layer.weight"
            weight = model.get_parameter(name)
            weight += d.T if weight.shape != d.shape else d
        with model.disable_adapter():
            model.eval()
            return float(model(input_ids=tokens, labels=tokens).loss)
    finally:
        model.load_state_dict(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    k = args.replicas
    module = LoraLM(args.rank)
    tokens = data()
    trainer = Trainer(
        strategy=DataOrderEnsemble(num_replicas=k, seed=0),
        callbacks=[SelectionMergeCallback(seed=0)],
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=16))
    strategy = trainer.strategy
    replicas = strategy.replica_states()
    base = strategy.initial_state.module
    layers = lora_layers(base)
    scale = 2.0  # lora_alpha / r
    adapters = [n for n in base if ".lora_" in n]
    merged_ab = {
        "select A,B": merge_state_dicts(
            [{n: s[n] for n in adapters} for s in replicas], method=ParameterSelection(), seed=0
        ),
        "average A,B": merge_state_dicts(
            [{n: s[n] for n in adapters} for s in replicas], method=WeightedAverage()
        ),
    }
    folds = [folded(s, layers, scale) for s in replicas]
    w0 = folded(base, layers, 0.0)
    merged_fold = {
        "select folded": merge_state_dicts(folds, method=ParameterSelection(), seed=0),
        "average folded": merge_state_dicts(folds, method=WeightedAverage()),
    }
    mean_delta = {layer: sum(delta(s, layer, scale) for s in replicas) / k for layer in layers}
    results: dict[str, dict[str, torch.Tensor]] = {
        name: {layer: delta(m, layer, scale) for layer in layers} for name, m in merged_ab.items()
    }
    results.update(
        {name: {layer: m[layer] - w0[layer] for layer in layers} for name, m in merged_fold.items()}
    )
    norm = sum(float(mean_delta[layer].square().sum()) for layer in layers) ** 0.5
    spread = sum(
        float((delta(s, layer, scale) - mean_delta[layer]).square().sum())
        for s in replicas
        for layer in layers
    )
    spread = (spread / k) ** 0.5 / norm
    print(f"K={k}, rank={args.rank}, {len(layers)} LoRA layers, {args.epochs} epochs")
    print(f"replicas' deltas around their mean: rms relative distance {spread:.3f}")
    print(f"{'merge':<16} {'|d - mean d| / |mean d|':>24} {'|d| / |mean d|':>16} {'loss':>8}")
    for name, deltas in results.items():
        dist = sum(float((deltas[la] - mean_delta[la]).square().sum()) for la in layers) ** 0.5
        size = sum(float(deltas[la].square().sum()) for la in layers) ** 0.5
        loss = loss_with_deltas(module, deltas, tokens)
        print(f"{name:<16} {dist / norm:>24.3f} {size / norm:>16.3f} {loss:>8.4f}")
    replica_losses = [
        loss_with_deltas(module, {la: delta(s, la, scale) for la in layers}, tokens)
        for s in replicas
    ]
    base_loss = loss_with_deltas(module, {}, tokens)
    print(
        f"replicas' losses: {', '.join(f'{x:.4f}' for x in replica_losses)}; base {base_loss:.4f}"
    )
    held = unique_bytes([base, *replicas])
    unshared = (k + 1) * unique_bytes([base])  # the initial state + K replica copies of it all
    print(
        f"replica store (initial + {k} replicas): {held / 2**20:.2f} MiB with the frozen base "
        f"shared, {unshared / 2**20:.2f} MiB without ({unshared / held:.1f}x)"
    )


def unique_bytes(states: list[dict[str, torch.Tensor]]) -> int:
    """Bytes of the distinct memory the states' tensors view (shared tensors count once)."""
    seen = {}
    for state in states:
        for t in state.values():
            seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = (
                t.numel() * t.element_size()
            )
    return sum(seen.values())


if __name__ == "__main__":
    main()
