"""Per-tensor merge rules: ``(regex -> method)`` pairs, first match wins."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import MergeError
from .methods import MergeMethod, ParameterSelection, WeightedAverage

__all__ = ["MergeRule", "load_rules", "make_method", "method_for"]

_METHODS = {"average": WeightedAverage, "selection": ParameterSelection}


def make_method(
    method: str,
    *,
    weights: Sequence[float] | None = None,
    probabilities: Sequence[float] | None = None,
    resample: int = 0,
) -> MergeMethod:
    """Build a method from its name: ``"average"`` (``weights``) or ``"selection"``.

    Example:
        >>> make_method("selection", resample=2)
        ParameterSelection(probabilities=None, resample=2)
    """
    if method == "average":
        if probabilities is not None or resample:
            raise MergeError("method 'average' takes weights, not probabilities or resample")
        return WeightedAverage(weights=None if weights is None else list(weights))
    if method == "selection":
        if weights is not None:
            raise MergeError(
                "method 'selection' takes probabilities, not weights (weights are for 'average')"
            )
        return ParameterSelection(
            probabilities=None if probabilities is None else list(probabilities),
            resample=resample,
        )
    raise MergeError(f"unknown merge method {method!r}: use one of {sorted(_METHODS)}")


@dataclass(frozen=True)
class MergeRule:
    """Tensors whose name matches ``pattern`` (``re.search``) are merged with ``method``.

    Example:
        >>> rule = MergeRule(r"norm", WeightedAverage())
        >>> rule.matches("layers.0.input_layernorm.weight")
        True
    """

    pattern: str
    method: MergeMethod

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise MergeError(f"merge rule pattern {self.pattern!r} is not a regex: {err}") from err

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def subset(self, keep: Sequence[int]) -> MergeRule:
        """This rule for the replicas ``keep`` only (see :meth:`MergeMethod.subset`)."""
        return MergeRule(self.pattern, self.method.subset(keep))

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any]) -> MergeRule:
        """``{"pattern": ..., "method": "average"|"selection", weights/probabilities/resample}``."""
        if not isinstance(entry, Mapping):
            raise MergeError(
                f"merge rule {entry!r} must be a mapping with 'pattern' and 'method' (and "
                "optionally weights, probabilities, resample)"
            )
        entry = dict(entry)
        unknown = set(entry) - {"pattern", "method", "weights", "probabilities", "resample"}
        if "pattern" not in entry or "method" not in entry or unknown:
            raise MergeError(
                f"merge rule {entry} must have 'pattern' and 'method' and only the optional keys "
                "weights, probabilities, resample"
            )
        for key in ("weights", "probabilities"):
            values = entry.get(key)
            if values is not None and not (
                isinstance(values, Sequence)
                and not isinstance(values, str)
                and all(_is_number(v) for v in values)
            ):
                raise MergeError(f"merge rule {entry}: {key} must be a list of numbers")
        resample = entry.get("resample", 0)
        if not (isinstance(resample, int) and not isinstance(resample, bool) and resample >= 0):
            raise MergeError(f"merge rule {entry}: resample must be an integer >= 0")
        pattern, method = entry.pop("pattern"), entry.pop("method")
        return cls(str(pattern), make_method(str(method), **entry))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        try:
            rules.append(MergeRule.from_mapping(entry))
        except MergeError as err:
            raise MergeError(f"merge rules file {path}, rule {position}: {err}") from err
    return rules
