"""Per-tensor merge rules: ``(regex -> method)`` pairs, first match wins."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MergeError
from .methods import MergeMethod, build_method, method_names

__all__ = ["MergeRule", "load_rules", "make_method", "method_for"]


def make_method(method: str, **params: Any) -> MergeMethod:
    """Build a registered method from its name and parameters (``None`` values are left out).

    Example:
        >>> make_method("selection", resample=2)
        ParameterSelection(probabilities=None, resample=2)
        >>> make_method("average", weights=None)
        WeightedAverage(weights=None)
    """
    return build_method(method, {k: v for k, v in params.items() if v is not None})


@dataclass(frozen=True)
class MergeRule:
    """Tensors whose name matches ``pattern`` (``re.search``) are merged with ``method``.

    ``source`` says where the rule came from (``"merge rules file PATH, rule 2"``), so that an
    error found later (weights that do not fit K) names it.

    Example:
        >>> from lightning_selmerge.merging import WeightedAverage
        >>> rule = MergeRule(r"norm", WeightedAverage())
        >>> rule.matches("layers.0.input_layernorm.weight")
        True
    """

    pattern: str
    method: MergeMethod
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise MergeError(f"merge rule pattern {self.pattern!r} is not a regex: {err}") from err

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    @property
    def label(self) -> str:
        """How errors name this rule: its ``source``, else its pattern."""
        return self.source or f"merge rule {self.pattern!r}"

    def validate(self, num_replicas: int) -> None:
        """The method's :meth:`~MergeMethod.validate`, its errors naming this rule."""
        try:
            self.method.validate(num_replicas)
        except MergeError as err:
            raise MergeError(f"{self.label} ({self.method}): {err}") from err

    def subset(self, keep: Sequence[int]) -> MergeRule:
        """This rule for the replicas ``keep`` only (see :meth:`MergeMethod.subset`)."""
        return MergeRule(self.pattern, self.method.subset(keep), self.source)

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any], source: str | None = None) -> MergeRule:
        """``{"pattern": ..., "method": NAME, <that method's parameters>}``.

        Example:
            >>> MergeRule.from_mapping({"pattern": "norm", "method": "average"}).method
            WeightedAverage(weights=None)
        """
        if not isinstance(entry, Mapping):
            raise MergeError(
                f"merge rule {entry!r} must be a mapping with 'pattern' and 'method' (and "
                "that method's parameters, e.g. weights, probabilities, resample)"
            )
        entry = dict(entry)
        if "pattern" not in entry or "method" not in entry:
            raise MergeError(
                f"merge rule {entry} must have 'pattern' and 'method' (one of "
                f"{method_names()}) and that method's parameters"
            )
        pattern, method = entry.pop("pattern"), entry.pop("method")
        try:
            built = build_method(str(method), entry)
        except MergeError as err:
            shown = {"pattern": pattern, "method": method, **entry}
            raise MergeError(f"merge rule {shown}: {err}") from err
        return cls(str(pattern), built, source)


def method_for(name: str, rules: Sequence[MergeRule], default: MergeMethod) -> MergeMethod:
    """The method of the first rule matching ``name``, else ``default``."""
    for rule in rules:
        if rule.matches(name):
            return rule.method
    return default


def load_rules(path: str | Path) -> list[MergeRule]:
    """Read rules from a YAML or JSON file holding a list of rule mappings.

    Example file::

        - pattern: "norm|ln_"
          method: average
        - pattern: "."
          method: selection
          resample: 1
    """
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise MergeError(f"cannot read merge rules from {path}: {err}") from err
    if not isinstance(entries, list):
        raise MergeError(
            f"merge rules file {path} must hold a list of {{pattern, method, ...}} mappings"
        )
    rules = []
    for position, entry in enumerate(entries, start=1):
        source = f"merge rules file {path}, rule {position}"
        try:
            rules.append(MergeRule.from_mapping(entry, source))
        except MergeError as err:
            raise MergeError(f"{source}: {err}") from err
    return rules
