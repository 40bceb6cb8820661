"""A DataOrderEnsemble fit with PositionLossMonitor on several gloo ranks (or one process).

``python tests/monitor_fit.py OUT DEVICES K SHARD_SIZE BATCH [--resume=STEP]``: Lightning's
subprocess launcher re-runs this script once per extra rank. Every rank writes
``OUT/rank_{r}.pt``: the monitor's records and first-epoch positions, and the ``imbalance/...``
metrics. With ``--resume=STEP`` the fit saves checkpoints every 3 steps and a second fit resumes
from the one at STEP; its monitor's records go to ``resumed`` in the same file. ``run`` is the
same fit in the calling process (``devices=1``), for the tests' reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from distributed_fit import trainer as distributed_trainer
from ensemble_support import Net, make_data
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_selmerge import PositionLossMonitor, SelectionMergeCallback


class LossNet(Net):
    """Net with per-sample losses: for the probe and as ``training_step``'s ``sample_loss``."""

    def per_sample_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, x, y = batch
        return ((self.net(x) - y) ** 2).reshape(-1)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> dict:
        losses = self.per_sample_loss(batch)
        return {"loss": losses.mean(), "sample_loss": losses.detach()}


def run(
    devices: int, k: int, shard: int, batch: int, out: Path | None = None, ckpt: str | None = None
) -> dict[str, Any]:
    """One fit (2 epochs, tuple batches: the monitor takes the samples from the data order);
    what its monitor recorded and logged."""
    torch.use_deterministic_algorithms(True)
    monitor = PositionLossMonitor(num_segments=4, probe_size=24, probe_batch_size=8)
    callbacks: list = [monitor, SelectionMergeCallback(resample=2, seed=5)]
    if out is not None:
        callbacks.append(
            ModelCheckpoint(out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
        )
    trainer = distributed_trainer(devices, k, shard, callbacks, offload_dir=None)
    data = make_data(64)
    trainer.fit(LossNet(), torch.utils.data.DataLoader(data, batch_size=batch), ckpt_path=ckpt)
    return {
        "records": monitor.records.table(),
        "positions": {r: monitor.first_positions_of(r) for r in range(k)},
        "metrics": {
            n: float(v) for n, v in trainer.callback_metrics.items() if n.startswith("imbalance/")
        },
    }


def main() -> None:
    out, devices, k, shard, batch = Path(sys.argv[1]), *map(int, sys.argv[2:6])
    resume = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--resume=")), 0)
    result = run(devices, k, shard, batch, out if resume else None)
    rank = torch.distributed.get_rank()
    if resume:
        again = run(devices, k, shard, batch, ckpt=str(out / "ckpt" / f"step={resume}.ckpt"))
        result["resumed"] = again
    torch.save(result, out / f"rank_{rank}.pt")


if __name__ == "__main__":
    main()
