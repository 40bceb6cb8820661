"""Per-sample losses (pure torch): one loss value per sequence/example, shape ``[B]``.

Both helpers compute in float32 whatever the logits' dtype. An example with no valid target
(every label equal to ``ignore_index``) has an undefined loss: it is returned as ``empty_value``,
NaN by default, and the imbalance statistics skip NaNs. Pass ``empty_value=0.0`` when you sum the
result into a training loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_per_sample_loss", "sequence_classification_per_sample_loss"]


def causal_lm_per_sample_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    empty_value: float = float("nan"),
) -> torch.Tensor:
    """Next-token cross-entropy averaged over each sequence's valid tokens.

    Logits at position ``t`` predict ``labels[:, t + 1]`` (the usual causal-LM shift, as in
    Hugging Face models); tokens whose label is ``ignore_index`` do not count.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``, unshifted.
        ignore_index: label value to skip (prompt / padding tokens).
        empty_value: value for a sequence without any valid token (NaN by default).

    Returns:
        ``[B]`` float32 tensor.

    Example:
        >>> logits = torch.zeros(2, 3, 5)
        >>> labels = torch.tensor([[1, 2, 3], [0, -100, -100]])
        >>> causal_lm_per_sample_loss(logits, labels)   # uniform logits: log(5) per token
        tensor([1.6094,    nan])
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal_lm_per_sample_loss: need logits [B, T, V] and labels [B, T], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(shift_labels.shape)
    valid = shift_labels != ignore_index
    count = valid.sum(dim=1)
    total = (token_loss * valid).sum(dim=1)
    out = total / count.clamp(min=1)
    return torch.where(count > 0, out, torch.full_like(out, empty_value))


def sequence_classification_per_sample_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    empty_value: float = float("nan"),
) -> torch.Tensor:
    """Cross-entropy of each example; ``[B, C]`` logits and ``[B]`` class labels -> ``[B]``.

    Example:
        >>> sequence_classification_per_sample_loss(torch.zeros(2, 4), torch.tensor([3, -100]))
        tensor([1.3863,    nan])
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"sequence_classification_per_sample_loss: need logits [B, C] and labels [B], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return torch.where(labels != ignore_index, loss, torch.full_like(loss, empty_value))
