"""A DataOrderEnsemble fit on several gloo ranks; run by tests/test_device_groups.py.

``python tests/distributed_fit.py OUT DEVICES K SHARD_SIZE BATCH [--resume=STEP]
[--offload-disk] [--record-steps] [--metric] [--validate]``: Lightning's subprocess launcher
re-runs this script once per extra rank. Every rank writes ``OUT/rank_{r}.pt`` (its replicas'
slices, layout, offsets); rank 0 writes ``OUT/merged.pt`` (the whole merge). With
``--resume=STEP`` the fit saves checkpoints every 3 steps, and a second fit resumes from the one
at STEP (after a sanity check) and writes ``OUT/resumed.pt``; ``--resume-epoch-end`` resumes
from epoch 0's end (after its validation) instead. With ``--record-steps`` every
rank's file also holds ``steps``: what ``strategy.steps_per_replica()`` and
``hf.optim.steps_per_model`` say in
``configure_optimizers``. With ``--metric`` the module also logs a torchmetrics mean of the
loss (``val_mean``) and syncs ``val_loss`` over the ranks. With ``--validate`` every rank's
file also holds ``validated``: what ``trainer.validate`` of the fitted module returns (and
``replicas_after``, the replicas' slices after it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ensemble_support import Net, make_data
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_selmerge import DataOrderEnsemble, SelectionMergeCallback


def trainer(
    devices: int,
    k: int,
    shard: int,
    callbacks: list,
    offload_dir: str | None,
    sanity_steps: int = 0,
) -> Trainer:
    strategy = DataOrderEnsemble(
        num_replicas=k,
        seed=3,
        shard_size=shard,
        offload="disk" if offload_dir else "cpu",
        offload_dir=offload_dir,
    )
    return Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=sanity_steps,
        deterministic=True,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


class MetricNet(Net):
    """Logs ``val_loss`` synced over the ranks and the same mean as a torchmetrics metric."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics import MeanMetric

        self.val_mean = MeanMetric()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val_loss", loss, sync_dist=True)
        self.val_mean.update(loss, weight=len(batch[0]))
        self.log("val_mean", self.val_mean)


class StepsNet(Net):
    """Records the schedule lengths a module sees in ``configure_optimizers``."""

    def configure_optimizers(self) -> dict | torch.optim.Optimizer:
        from lightning_selmerge.hf.optim import steps_per_model  # imports transformers

        strategy = self.trainer.strategy
        assert isinstance(strategy, DataOrderEnsemble)
        self.steps = {
            "steps_per_replica": strategy.steps_per_replica(),
            "steps_per_model": steps_per_model(self),
        }
        return super().configure_optimizers()


def main() -> None:
    out, devices, k, shard, batch = sys.argv[1], *map(int, sys.argv[2:6])
    resume_step = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--resume=")), 0)
    epoch_end = "--resume-epoch-end" in sys.argv
    resume = resume_step > 0 or epoch_end
    offload_dir = str(Path(out) / "offload") if "--offload-disk" in sys.argv else None
    out_dir = Path(out)
    torch.use_deterministic_algorithms(True)
    data = make_data(64)
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    val = torch.utils.data.DataLoader(data, batch_size=16)
    callbacks: list = [SelectionMergeCallback(resample=2, seed=5)]
    if resume:
        callbacks.append(
            ModelCheckpoint(
                out_dir / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
            )
        )
    if epoch_end:  # after validation, as ModelCheckpoint saves by default
        callbacks.append(ModelCheckpoint(out_dir / "ckpt", save_top_k=-1, filename="{epoch}"))
    module = StepsNet() if "--record-steps" in sys.argv else Net()
    if "--metric" in sys.argv:
        module = MetricNet()
    fit = trainer(devices, k, shard, callbacks, offload_dir)
    fit.fit(module, loader, val)
    strategy = fit.strategy
    assert isinstance(strategy, DataOrderEnsemble)
    rank = fit.global_rank
    replicas = strategy.local_replica_states()
    metrics = {n: float(v) for n, v in fit.callback_metrics.items()}
    validated = fit.validate(module, val, verbose=False) if "--validate" in sys.argv else None
    torch.save(
        {
            "layout": strategy.layout.to_dict(),
            "shard_rank": strategy.layout.shard_rank,
            "replicas": replicas,
            "offsets": dict(strategy._offsets),
            "metrics": metrics,
            "validated": validated,
            "replicas_after": strategy.local_replica_states(),
            # a state only rank 0 writes: the other ranks take part in the gathers, keep nothing
            "full_on_rank_0": sorted(strategy.full_state(callbacks[0].merged_state, rank=0)),
            "steps": getattr(module, "steps", None),
            "threads": torch.get_num_threads(),
        },
        out_dir / f"rank_{rank}.pt",
    )
    merged = strategy.full_state(callbacks[0].merged_state)
    if rank == 0:
        torch.save(merged, out_dir / "merged.pt")
    if resume:
        again = SelectionMergeCallback(resample=2, seed=5)
        # the sanity check validates the checkpoint's merge, before training starts
        second = trainer(devices, k, shard, [again], offload_dir, sanity_steps=1)
        name = "epoch=0.ckpt" if epoch_end else f"step={resume_step}.ckpt"
        second.fit(Net(), loader, val, ckpt_path=str(out_dir / "ckpt" / name))
        resumed = second.strategy.full_state(again.merged_state)
        if rank == 0:
            torch.save(resumed, out_dir / "resumed.pt")


if __name__ == "__main__":
    main()
