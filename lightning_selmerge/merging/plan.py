"""The per-tensor merge plan that every driver (in memory, collective, checkpoints) follows.

A driver reads tensors its own way (state dicts, ranks' slices, memory-mapped files, or one
replica at a time), but what happens to each tensor is decided here, once:

* the default method (:class:`ParameterSelection`) and the per-tensor rules
  (:meth:`MergePlan.method_for`), every method validated against K once, a rule's error naming
  the rule (and its file);
* whether a tensor needs the base, and the one error when it is missing
  (:meth:`MergePlan.base_for`);
* tied tensors, merged once under one key name (:func:`tie_groups`);
* what the chunks need from the whole tensor (:meth:`MergePlan.prepare`, e.g. TIES' magnitude
  thresholds), so the result does not depend on the chunk size;
* leaving out replicas that hold NaN/Inf and merging again (:func:`merge_dropping_nonfinite`).

A streaming driver (replicas read one at a time) uses the same plan; a method's
:meth:`~lightning_selmerge.merging.methods.MergeMethod.streaming` gives its per-chunk accumulator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from . import ties
from .errors import MergeError, NonFiniteError
from .finite import check_nonfinite_mode, surviving_replicas
from .keyed_random import KeyedRandom
from .methods import MergeMethod, ParameterSelection
from .methods.base import require_base
from .rules import MergeRule

__all__ = [
    "MergePlan",
    "check_same_ties",
    "checked_tie_groups",
    "merge_dropping_nonfinite",
    "prepare_tensor",
    "tie_groups",
]

T = TypeVar("T")


@dataclass(frozen=True)
class MergePlan:
    """How each tensor of a K-replica merge is merged.

    Build it with :meth:`create`, which fills in the default method and validates every method.

    Example:
        >>> plan = MergePlan.create(None, (), seed=0, num_replicas=2)
        >>> plan.method_for("w"), plan.needs_base("w")
        (ParameterSelection(probabilities=None, resample=0), False)
    """

    method: MergeMethod
    rules: tuple[MergeRule, ...]
    seed: int
    num_replicas: int
    #: what the names carry in the training module and not in the files merged (a draw prefix,
    #: e.g. ``"model."``), and per rule whether it is matched against the prefixed names: a rule
    #: that matches none of the files' own names (one written for the in-process names, such as
    #: ``^model\.lm_head`` for a GPT-2 directory) is; one that matches some of them is not, so
    #: each rule keeps one namespace (see :meth:`with_rule_prefix`)
    rule_prefix: str = ""
    prefixed_rules: tuple[bool, ...] = ()
    rng: KeyedRandom = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rng", KeyedRandom(self.seed))

    @classmethod
    def create(
        cls,
        method: MergeMethod | None,
        rules: Sequence[MergeRule],
        seed: int,
        num_replicas: int,
    ) -> MergePlan:
        """The plan for ``num_replicas`` replicas; raises :class:`MergeError` for a method that
        cannot merge them (a rule's error names the rule and its file)."""
        plan = cls(
            method if method is not None else ParameterSelection(),
            tuple(rules),
            int(seed),
            num_replicas,
        )
        plan.method.validate(num_replicas)
        seen = {id(plan.method)}
        for rule in plan.rules:
            if id(rule.method) not in seen:
                seen.add(id(rule.method))
                rule.validate(num_replicas)
        return plan

    def with_rule_prefix(self, prefix: str, names: Iterable[str]) -> MergePlan:
        """This plan for tensors ``names`` (all of the merge's) whose draws carry ``prefix``:
        each rule matching none of ``names`` is matched against ``prefix`` + the name.

        Example:
            >>> from lightning_selmerge.merging import MergeRule, WeightedAverage
            >>> rules = [MergeRule(r"^model\\.lm_head", WeightedAverage()),
            ...          MergeRule(r"^model\\.", WeightedAverage())]
            >>> plan = MergePlan.create(None, rules, seed=0, num_replicas=2)
            >>> plan = plan.with_rule_prefix("model.", ["model.layers.0.w", "lm_head.weight"])
            >>> plan.prefixed_rules, plan.method_for("lm_head.weight") is rules[0].method
            ((True, False), True)
        """
        if prefix == self.rule_prefix:
            return self
        names = list(names)
        prefixed = tuple(not any(rule.matches(name) for name in names) for rule in self.rules)
        return replace(self, rule_prefix=prefix, prefixed_rules=prefixed if prefix else ())

    def _rule_target(self, position: int, name: str) -> str:
        """The name rule ``position`` (0-based) is matched against for tensor ``name``."""
        prefixed = self.prefixed_rules and self.prefixed_rules[position]
        return self.rule_prefix + name if prefixed else name

    def method_for(self, name: str) -> MergeMethod:
        """The method of the first rule matching ``name`` (in the rule's namespace, see
        :meth:`with_rule_prefix`), else the default method."""
        for position, rule in enumerate(self.rules):
            if rule.matches(self._rule_target(position, name)):
                return rule.method
        return self.method

    def warn_unmatched_rules(self, names: Iterable[str]) -> None:
        """Warn of each rule no tensor of ``names`` matches (a mistyped pattern merges nothing
        the way it says)."""
        names = list(names)
        if not names:
            return
        for position, rule in enumerate(self.rules):
            if not any(rule.matches(self._rule_target(position, name)) for name in names):
                where = rule.source or f"rule {position + 1}"
                warnings.warn(
                    f"merge rule {where} (pattern {rule.pattern!r}) matches no tensor of the "
                    f"replicas (e.g. {names[0]!r}): check its pattern (re.search on the names)",
                    stacklevel=3,
                )

    def needs_base(self, name: str) -> bool:
        """Whether floating-point tensor ``name`` needs the base weights."""
        return self.method_for(name).needs_base

    def base_for(self, name: str, base: Mapping[str, T] | None, hint: str) -> T | None:
        """``base[name]`` when tensor ``name``'s method needs the base, else ``None``.

        The one "needs the base" error, ending with ``pass {hint}``, when it is missing.
        """
        method = self.method_for(name)
        if not method.needs_base:
            return None
        require_base(name, method, base, hint)
        if name not in base:
            raise MergeError(
                f"tensor {name!r}: {method} needs the base (pre-trained) weights, but the base "
                f"has no tensor {name!r}: pass {hint} holding every tensor of the replicas"
            )
        return base[name]

    def prepare(
        self,
        name: str,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        chunk_numel: int,
    ) -> list[Any] | None:
        """What tensor ``name``'s chunks need from each replica's whole tensor (see
        :meth:`~lightning_selmerge.merging.methods.MergeMethod.prepare_replica`), or ``None``."""
        return prepare_tensor(self.method_for(name), name, replicas, base, chunk_numel)

    def subset(self, keep: Sequence[int]) -> MergePlan:
        """The plan for the replicas ``keep`` only: per-replica parameters follow them."""
        subset = MergePlan.create(
            self.method.subset(keep),
            [r.subset(keep) for r in self.rules],
            self.seed,
            len(keep),
        )
        return replace(subset, rule_prefix=self.rule_prefix, prefixed_rules=self.prefixed_rules)


def prepare_tensor(
    method: MergeMethod,
    name: str,
    replicas: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    chunk_numel: int,
) -> list[Any] | None:
    """``method.prepare_replica`` of each whole replica tensor (``None`` when it needs none)."""
    if not method.needs_whole_tensor:
        return None
    flat_base = None if base is None else base.reshape(-1)
    return [method.prepare_replica(name, r.reshape(-1), flat_base, chunk_numel) for r in replicas]


def tie_groups(state: Mapping[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    """``(key name, names)`` of the tensors sharing storage (tied weights), sorted by key name.

    A group is merged once; its random draws are keyed by its canonical name (the one
    ``save_pretrained`` keeps: :func:`~lightning_selmerge.merging.ties.canonical_name`), and every
    name gets the result (so tied tensors stay tied). The order is the same on every rank.

    Example:
        >>> w = torch.zeros(2)
        >>> tie_groups({"lm_head.weight": w, "embed.weight": w, "bias": torch.zeros(1)})
        [('bias', ['bias']), ('embed.weight', ['lm_head.weight', 'embed.weight'])]
    """
    return sorted(ties.tie_groups(state).items())


def checked_tie_groups(
    replicas: Sequence[Mapping[str, torch.Tensor]], labels: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """:func:`tie_groups` of the first replica, after :func:`check_same_ties` of the others."""
    groups = tie_groups(replicas[0])
    for replica, label in zip(replicas[1:], labels[1:]):
        check_same_ties(groups, replica, (labels[0], label))
    return groups


def _tied(groups: Sequence[tuple[str, list[str]]]) -> set[frozenset[str]]:
    return {frozenset(names) for _, names in groups if len(names) > 1}


def check_same_ties(
    groups: Sequence[tuple[str, list[str]]],
    state: Mapping[str, torch.Tensor],
    labels: tuple[str, str],
) -> None:
    """Refuse a replica (``state``, ``labels[1]``) whose tied tensors are not those of
    ``groups``, the first replica's (``labels[0]``): a merge reads one name of each group.

    Example:
        >>> w = torch.zeros(2)
        >>> groups = tie_groups({"head": w, "embed": w})
        >>> check_same_ties(groups, {"head": w, "embed": w.clone()}, ("replica 0", "replica 1"))
        Traceback (most recent call last):
        ...
        lightning_selmerge.merging.errors.MergeError: replica 1 ties its tensors unlike ...
    """
    first, other = _tied(groups), _tied(tie_groups(state))
    if first == other:
        return
    mine, theirs = sorted(map(sorted, first - other)), sorted(map(sorted, other - first))
    where = (
        f"{' and '.join(mine[0])} are tied in {labels[0]}, not in {labels[1]}"
        if mine
        else f"{' and '.join(theirs[0])} are tied in {labels[1]}, not in {labels[0]}"
    )
    raise MergeError(
        f"{labels[1]} ties its tensors unlike {labels[0]} ({where}): merge replicas of one "
        "model, tied alike (a copy that untied them: call model.tie_weights() before taking the "
        "state dict, or save with save_pretrained, which keeps one name per tie)"
    )


def merge_dropping_nonfinite(
    plan: MergePlan,
    attempt: Callable[[MergePlan, Sequence[int]], T],
    *,
    nonfinite: str,
    labels: Sequence[str],
    find_bad: Callable[[], Mapping[int, str]],
) -> T:
    """``attempt(plan, all replicas)``; on :class:`NonFiniteError` with ``nonfinite="drop"``,
    find the bad replicas (``find_bad``: index -> tensor), warn, and ``attempt`` again with the
    others and the plan for them (:meth:`MergePlan.subset`).

    Example:
        >>> plan = MergePlan.create(None, (), seed=0, num_replicas=2)
        >>> merge_dropping_nonfinite(plan, lambda plan, keep: list(keep), nonfinite="error",
        ...                          labels=["replica 0", "replica 1"], find_bad=dict)
        [0, 1]
    """
    check_nonfinite_mode(nonfinite)
    try:
        return attempt(plan, list(range(len(labels))))
    except NonFiniteError:
        if nonfinite == "error":
            raise
    keep = surviving_replicas(find_bad(), labels)
    return attempt(plan.subset(keep), keep)


def check_whole_tensor(plan: MergePlan, name: str, sharded: bool) -> None:
    """Refuse a method that needs the whole tensor (e.g. TIES' trim) on one shard of it."""
    method = plan.method_for(name)
    if sharded and method.needs_whole_tensor:
        raise MergeError(
            f"tensor {name!r}: {method} needs the whole tensor (its per-tensor statistics), but "
            "the replicas are sharded: merge unsharded replicas (shard_size=1), or save them "
            "and merge the files with lightning-selmerge merge"
        )
