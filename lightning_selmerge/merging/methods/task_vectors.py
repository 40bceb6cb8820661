"""What the task-vector methods (task arithmetic, TIES, DARE) share: task vectors, their two
combiners (a weighted mean or sum, and a keyed random selection), and the final scaling.

A replica's *task vector* is its difference from the base, computed in float32 (float64 for
float64 tensors). The *selection* combiner keeps, per element, one replica's task vector drawn
among the *eligible* ones (e.g. TIES' replicas agreeing with the elected sign) with probability
proportional to its weight, from the element's 16-bit uniform ``u`` of stream 0: the first
eligible replica ``c`` (in replica order) whose cumulative weight exceeds ``u * total / 2**16``.
The draws are keyed by (seed, tensor name, element offset), so the result does not depend on
the chunking or the rank layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from ..errors import MergeError
from ..keyed_random import UNIFORM_LEVELS, KeyedRandom
from .base import ChunkContext, MergeMethod, check_weights, compute_dtype

__all__ = [
    "TaskVectorMethod",
    "check_combine",
    "check_task_weights",
    "keyed_choice",
    "pick",
    "reference_choice",
    "task_vectors",
    "with_base",
]

#: The stream of the selection combiner's draws.
CHOICE_STREAM = 0


@dataclass(frozen=True)
class TaskVectorMethod(MergeMethod):
    """The parameters and checks every task-vector method shares: one weight per replica, the
    combined task vector's factor ``scale`` (lambda), and the combiner, one of
    :attr:`combines`. Keyword-only, so a method's own parameters come first. Needs the base.

    Example:
        >>> from lightning_selmerge.merging.methods import Dare
        >>> Dare(0.3, weights=[1, 2]).subset([1])
        Dare(weights=[2], scale=1.0, combine='mean', drop_rate=0.3)
    """

    weights: Sequence[float] | None = field(
        default=None,
        kw_only=True,
        metadata={"help": "one non-negative weight per replica, e.g. [1,1,2] (default: all 1)"},
    )
    scale: float = field(
        default=1.0, kw_only=True, metadata={"help": "lambda: the combined task vector's factor"}
    )
    combine: str = field(
        default="mean", kw_only=True, metadata={"help": "mean|selection (default: mean)"}
    )
    needs_base = True
    computes_with_base = True
    #: the accepted values of ``combine``.
    combines: ClassVar[tuple[str, ...]] = ("mean", "selection")

    @property
    def negative_weights_ok(self) -> bool:
        """Whether a weight may be negative (only where nothing is drawn by weight)."""
        return False

    def check_parameters(self) -> None:
        check_combine(self, self.combine, self.combines)
        check_task_weights(self.weights, None, negative_ok=self.negative_weights_ok)

    def validate(self, num_replicas: int) -> None:
        super().validate(num_replicas)
        check_task_weights(self.weights, num_replicas, negative_ok=self.negative_weights_ok)

    def subset(self, keep: Sequence[int]) -> TaskVectorMethod:
        """The kept replicas' weights (merged as if they were the only inputs)."""
        if self.weights is None:
            return self
        return replace(self, weights=[self.weights[k] for k in keep])


def check_combine(method: object, combine: str, choices: Sequence[str]) -> None:
    if combine not in choices:
        raise MergeError(f"{method}: combine must be one of {list(choices)}, got {combine!r}")


def check_task_weights(
    weights: Sequence[float] | None, num_replicas: int | None, negative_ok: bool = False
) -> None:
    """Finite weights (non-negative with a positive sum unless ``negative_ok``), one per
    replica when ``num_replicas`` is given."""
    check_weights(weights, num_replicas, "weights")
    if weights is None or negative_ok:
        return
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise MergeError(
            f"weights {list(weights)} must be >= 0 with a positive sum (they are selection "
            "probabilities and mean weights)"
        )


def task_vectors(
    replicas: Sequence[torch.Tensor], base: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(base, [replica - base])`` in the compute dtype (float32, float64 for float64)."""
    compute = compute_dtype(base)
    wide_base = base.to(compute)
    return wide_base, [r.to(compute) - wide_base for r in replicas]


def keyed_choice(
    ctx: ChunkContext,
    numel: int,
    weights: Sequence[float] | None,
    num_replicas: int,
    eligible: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Per element, the index of the replica the selection combiner keeps (int64), ``-1`` where
    no replica is eligible. ``eligible``: ``[K, numel]`` bool, or ``None`` for all."""
    u = ctx.rng.uniform16(ctx.name, CHOICE_STREAM, ctx.start, numel, device).to(torch.float64)
    w = torch.tensor(
        weights if weights is not None else [1.0] * num_replicas, dtype=torch.float64, device=device
    ).unsqueeze(1)
    mass = w.expand(num_replicas, numel) if eligible is None else w * eligible
    cumulative = mass.cumsum(0)
    total = cumulative[-1]
    target = u * total / UNIFORM_LEVELS
    choice = (cumulative <= target).sum(0)
    return torch.where(total > 0, choice, -1)


def reference_choice(
    rng: KeyedRandom,
    name: str,
    offset: int,
    weights: Sequence[float] | None,
    eligible: Sequence[bool],
) -> int:
    """:func:`keyed_choice` for one element, plainly: ``-1`` when none is eligible."""
    u = float(rng.uniform16_at(name, CHOICE_STREAM, torch.tensor([offset])).item())
    weights = weights if weights is not None else [1.0] * len(eligible)
    masses = [float(w) if ok else 0.0 for w, ok in zip(weights, eligible)]
    total = 0.0
    for m in masses:
        total += m
    if not total > 0:
        return -1
    target = u * total / UNIFORM_LEVELS
    cumulative = 0.0
    for k, m in enumerate(masses):
        cumulative += m
        if cumulative > target:
            return k
    raise AssertionError("the cumulative weight ends at the total, above the target")


def pick(deltas: Sequence[torch.Tensor], choice: torch.Tensor) -> torch.Tensor:
    """``deltas[choice[i]][i]`` per element, ``0`` where ``choice`` is ``-1``."""
    stacked = torch.stack(list(deltas))
    picked = stacked.gather(0, choice.clamp(min=0).unsqueeze(0)).squeeze(0)
    return picked.masked_fill_(choice < 0, 0.0)


def with_base(
    wide_base: torch.Tensor, mixed: torch.Tensor, scale: float, like: torch.Tensor
) -> torch.Tensor:
    """``base + scale * mixed`` (``mixed`` scaled in place; as mergekit, not when ``scale`` is
    1), rounded once to ``like``'s dtype."""
    if scale != 1:
        mixed.mul_(torch.tensor(scale, dtype=mixed.dtype))
    return (wide_base + mixed).to(like.dtype)
