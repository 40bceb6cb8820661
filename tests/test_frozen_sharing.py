"""Frozen parameters (requires_grad=False) are held once, not per replica: in memory, in the
disk offload, in checkpoints; the merge takes them as they are."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from ensemble_support import Net, ensemble_trainer, fit
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

from lightning_selmerge.ensemble import CHECKPOINT_KEY, DataOrderEnsemble, SelectionMergeCallback
from lightning_selmerge.merging.ties import storage_key

warnings.filterwarnings("ignore", ".*does not have many workers.*")

K = 3
FROZEN = ("net.0.weight", "net.0.bias")


class PartlyFrozen(Net):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[0].requires_grad_(False)


def unique_bytes(states) -> int:
    """Bytes of the distinct memory that the states' tensors view."""
    seen = {}
    for state in states:
        for tensor in state.values():
            seen[storage_key(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def run(tmp: Path | None = None, ckpt_path: str | None = None, module=None, **strategy_kwargs):
    module = module or PartlyFrozen(scheduler=True, dropout=0.2)
    merge = SelectionMergeCallback(resample=1, seed=7)
    callbacks: list[Callback] = [merge]
    kwargs = {}
    if tmp is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=5, save_top_k=-1))
        kwargs["enable_checkpointing"] = True
    strategy = DataOrderEnsemble(num_replicas=K, seed=3, **strategy_kwargs)
    _, strategy = fit(
        module, K, 2, callbacks, val=True, strategy=strategy, ckpt_path=ckpt_path, **kwargs
    )
    return module, merge, strategy


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("frozen_ckpts")
    module, merge, strategy = run(tmp)
    return tmp, module, merge, strategy


def test_frozen_parameters_are_held_once_and_merged_as_they_are(uninterrupted) -> None:
    _, module, merge, strategy = uninterrupted
    initial = strategy.initial_state.module
    replicas = strategy.replica_states()
    for name in FROZEN:
        keys = {storage_key(state[name]) for state in replicas}
        assert keys == {storage_key(initial[name])}  # one tensor, not K copies
        assert torch.equal(merge.merged_state[name], initial[name])
        assert torch.equal(module.state_dict()[name], initial[name])
    for name in ("net.3.weight", "net.3.bias"):  # trained: one copy per replica, all different
        assert len({storage_key(state[name]) for state in replicas}) == K
        assert not torch.equal(replicas[0][name], replicas[1][name])
    frozen = sum(initial[n].numel() * 4 for n in FROZEN)
    trained = sum(t.numel() * 4 for n, t in initial.items() if n not in FROZEN)
    assert unique_bytes([initial, *replicas]) == frozen + (K + 1) * trained


def test_disk_offload_writes_no_frozen_tensor_and_gives_the_same_run(
    uninterrupted, tmp_path: Path
) -> None:
    _, module, _, strategy = uninterrupted
    disk_module, _, disk = run(offload="disk", offload_dir=str(tmp_path))
    for name, tensor in module.state_dict().items():
        assert torch.equal(disk_module.state_dict()[name], tensor), name
    for got, want in zip(disk.replica_states(), strategy.replica_states()):
        assert all(torch.equal(got[n], want[n]) for n in want)
    for k in range(K):
        with safe_open(tmp_path / f"replica_{k}.safetensors", "pt") as handle:
            assert not set(handle.keys()) & set(FROZEN)


def test_checkpoints_hold_frozen_tensors_once_and_resume_bit_identical(uninterrupted) -> None:
    tmp, module, _, strategy = uninterrupted
    ckpt = tmp / "epoch=1-step=45.ckpt"  # inside replica 2 of epoch 1
    saved = torch.load(ckpt, weights_only=False)[CHECKPOINT_KEY]
    for name in FROZEN:
        states = [saved["initial"]["module"], saved["live"]]
        states += [r["module"] for r in saved["replicas"] if r is not None]
        assert len(states) == K + 1
        assert len({s[name].untyped_storage().data_ptr() for s in states}) == 1, name
    resumed_module, _, resumed = run(ckpt_path=str(ckpt))
    for name, tensor in module.state_dict().items():
        assert torch.equal(resumed_module.state_dict()[name], tensor), name
    replicas = resumed.replica_states()
    for got, want in zip(replicas, strategy.replica_states()):
        assert all(torch.equal(got[n], want[n]) for n in want)
    initial = resumed.initial_state.module
    for name in FROZEN:  # shared again after the resume
        assert {storage_key(s[name]) for s in replicas} == {storage_key(initial[name])}


class UnfreezeAtEpoch1(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            pl_module.net[0].requires_grad_(True)


def test_a_parameter_unfrozen_during_the_fit_trains_per_replica() -> None:
    module = PartlyFrozen()
    strategy = DataOrderEnsemble(num_replicas=K, seed=3)
    fit(module, K, 2, [SelectionMergeCallback(), UnfreezeAtEpoch1()], strategy=strategy)
    initial = strategy.initial_state.module["net.0.weight"]
    replicas = [s["net.0.weight"] for s in strategy.replica_states()]
    for k in range(K):
        assert not torch.equal(replicas[k], initial)  # trained in epoch 1
        assert not torch.equal(replicas[k], replicas[(k + 1) % K])  # each on its own order


class LoraLM(LightningModule):
    """A tiny GPT-2 with PEFT LoRA adapters on the attention projection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2
        )
        base = transformers.GPT2LMHeadModel(config)
        lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0)
        self.model = peft.get_peft_model(base, lora)
        self.model.train()

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def test_a_peft_lora_model_shares_its_frozen_base() -> None:
    module = LoraLM()
    names = dict(module.named_parameters(remove_duplicate=False))
    lora = sorted(n for n, p in names.items() if p.requires_grad)
    frozen = sorted(n for n, p in names.items() if not p.requires_grad)
    assert lora and all("lora_" in n for n in lora) and len(frozen) > len(lora)
    tokens = torch.randint(0, 32, (24, 12), generator=torch.Generator().manual_seed(1))
    merge = SelectionMergeCallback(seed=1)
    trainer = ensemble_trainer(DataOrderEnsemble(num_replicas=K, seed=3), [merge])
    trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=4))
    strategy = trainer.strategy
    initial = strategy.initial_state.module
    replicas = strategy.replica_states()
    for name in frozen:
        assert {storage_key(s[name]) for s in replicas} == {storage_key(initial[name])}, name
        assert torch.equal(merge.merged_state[name], initial[name])
    for name in lora:
        if "lora_B" in name:  # B starts at 0: every replica moved it its own way
            assert not torch.equal(replicas[0][name], replicas[1][name]), name
    frozen_bytes = unique_bytes([{n: initial[n] for n in frozen}])  # wte = lm_head: once
    shared = unique_bytes([initial, *replicas])
    per_replica = unique_bytes([{n: t for n, t in initial.items() if n not in frozen}])
    assert shared == frozen_bytes + (K + 1) * per_replica
