"""One replica job on several gloo ranks (DDP); run by tests/test_replica_jobs.py.

``python tests/replica_job_worker.py OUT DEVICES K REPLICA [fsdp2]``: Lightning's subprocess
launcher re-runs this script once per extra rank; ``fsdp2`` shards the module with FSDP2
``fully_shard`` under ``ModelParallelStrategy`` (its DCP route to a full state dict) instead of
DDP. Every rank writes ``OUT/rank_{r}.pt`` with the sample
indices of each of its training batches and its final weights; the job writes its snapshots to
``OUT/snapshots``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ensemble_support import BATCH, Net, make_data
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from lightning_selmerge import ReplicaJob


class SeenBatches(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.seen.append((trainer.current_epoch, batch[0].tolist()))


class ShardedNet(Net):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def main() -> None:
    out, devices, k, replica = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    sharded = sys.argv[5:] == ["fsdp2"]
    net = ShardedNet(dropout=0.3) if sharded else Net(dropout=0.3)
    seed_everything(5)
    seen = SeenBatches()
    trainer = Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        if sharded
        else "ddp",
        accelerator="cpu",
        devices=devices,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[ReplicaJob(k, replica, seed=3, snapshot_dir=out / "snapshots"), seen],
    )
    trainer.fit(net, DataLoader(make_data(), batch_size=BATCH, shuffle=True))
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    else:
        state = {n: t.detach().clone() for n, t in net.state_dict().items()}
    torch.save({"seen": seen.seen, "state": state}, out / f"rank_{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
