"""A fixed probe subset of the training set, re-evaluated with ``module.per_sample_loss``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Subset

__all__ = ["PositionProbe"]


def _to_device(trainer: Any | None, batch: Any, device: torch.device) -> Any:
    """Move a probe batch as training moves it: through the module's trainer's strategy (the
    module's ``transfer_batch_to_device`` and batch-transfer hooks included), else with
    Lightning's ``move_data_to_device`` (any object with ``.to``, e.g. a ``BatchEncoding``)."""
    if trainer is not None:
        return trainer.strategy.batch_to_device(batch, device)
    return move_data_to_device(batch, device)


def _attached_trainer(module: torch.nn.Module) -> Any | None:
    """The Trainer ``module`` is the LightningModule of, else ``None``."""
    if not isinstance(module, LightningModule):
        return None
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None
    return trainer if trainer is not None and trainer.lightning_module is module else None


def _precision_context(trainer: Any | None) -> AbstractContextManager:
    """Validation's precision (``bf16-mixed`` autocast, ...) when a Trainer runs the module: the
    probe scores a model as validation does."""
    return trainer.precision_plugin.val_step_context() if trainer is not None else nullcontext()


def _module_device(module: torch.nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


class PositionProbe:
    """Evaluate a fixed subset of a dataset, one loss per sample, in eval mode without grads.

    Args:
        dataset: the training dataset (map-style), items as the training loader sees them.
        indices: dataset indices of the probe samples (kept in this order).
        batch_size: probe batch size.
        collate_fn: the training loader's collate function (``None``: torch's default).

    Example:
        >>> import torch
        >>> class Model(torch.nn.Module):
        ...     def per_sample_loss(self, batch):
        ...         return batch["x"].float()
        >>> data = [{"x": i} for i in range(10)]
        >>> PositionProbe(data, indices=[7, 3], batch_size=1).evaluate(Model()).tolist()
        [7.0, 3.0]
    """

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int] | torch.Tensor,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        self.batch_size = int(batch_size)
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return self.indices.numel()

    @torch.no_grad()
    def evaluate(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Losses ``[len(indices)]`` (float32, CPU) from ``loss_fn(batch)``.

        ``loss_fn`` defaults to ``module.per_sample_loss``. The module is put in eval mode and
        each of its submodules restored to its own previous mode afterwards (as Lightning's
        validation does: a submodule kept in eval mode while training stays so); under a
        Trainer it runs in validation's precision context (e.g. ``bf16-mixed`` autocast).
        """
        fn = loss_fn if loss_fn is not None else getattr(module, "per_sample_loss", None)
        if not callable(fn):
            raise AttributeError(
                f"{type(module).__name__} has no per_sample_loss(batch) -> Tensor[B]; define it "
                "(see lightning_selmerge.imbalance.losses) or pass loss_fn."
            )
        loader = DataLoader(
            Subset(self.dataset, self.indices.tolist()),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=0,
        )
        device = _module_device(module)
        trainer = _attached_trainer(module)
        modes = {sub: sub.training for sub in module.modules()}
        module.eval()
        out: list[torch.Tensor] = []
        try:
            for batch in loader:
                with _precision_context(trainer):
                    losses = fn(_to_device(trainer, batch, device))
                losses = torch.as_tensor(losses).detach().float().reshape(-1).cpu()
                out.append(losses)
        finally:
            for sub, training in modes.items():
                sub.training = training
        result = torch.cat(out) if out else torch.empty(0)
        if result.numel() != len(self):
            raise ValueError(
                f"per_sample_loss returned {result.numel()} values for {len(self)} probe samples; "
                "it must return one loss per sample, shape [B]."
            )
        return result
