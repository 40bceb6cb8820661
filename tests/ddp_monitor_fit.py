"""A plain data-parallel fit (Lightning's DDP, gloo) with ``PositionLossMonitor(probe_size=0)``.

``python tests/ddp_monitor_fit.py OUT DEVICES``: Lightning's subprocess launcher re-runs this
script once per extra rank. Every rank writes ``OUT/rank_{r}.pt``: the ``imbalance/...`` values
it logged at each epoch end, and the rows it recorded itself (each rank trains its own part).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_selmerge import PositionLossMonitor
from lightning_selmerge.data import IndexedDataset

N = 50


def dataset() -> IndexedDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return IndexedDataset(TensorDataset(x, y[:, None]), field_names=("x", "y"))


class LossNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        losses = ((self.net(batch["x"]) - batch["y"]) ** 2).reshape(-1)
        return {"loss": losses.mean(), "sample_loss": losses.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Logged(Callback):
    """The monitor's logged values at each epoch end (it logs before this callback runs)."""

    def __init__(self) -> None:
        self.by_epoch: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.by_epoch.append({n: float(v) for n, v in metrics.items() if "imbalance/" in n})


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    monitor, logged = PositionLossMonitor(num_segments=4, probe_size=0), Logged()
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[monitor, logged],
    )
    trainer.fit(LossNet(), DataLoader(dataset(), batch_size=4, shuffle=True))
    rows = monitor.records.table(epoch=1)
    result = {"logged": logged.by_epoch, "rows_epoch_1": rows}
    torch.save(result, out / f"rank_{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
