"""Merge methods by name: each method class registers itself and declares its parameters.

The CLI's ``--method`` choices and options, the YAML rules' keys and the callback's string
shortcuts all come from here, so a new method is one file that calls :func:`register_method`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import MergeError

__all__ = ["build_method", "method_class", "method_names", "register_method"]

_REGISTRY: dict[str, type] = {}

M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`~.base.MergeMethod` subclass available as ``name``."""

    def register(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"merge method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def method_names() -> list[str]:
    """The registered names, sorted.

    Example:
        >>> "selection" in method_names() and "average" in method_names()
        True
    """
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}: use one of {method_names()}") from None


def build_method(name: str, params: Mapping[str, Any] | None = None) -> Any:
    """The method ``name`` with ``params`` (checked against its declared parameters).

    Unknown parameter names and values of the wrong type are refused naming the method and what
    it takes; the values' own checks that do not depend on K run here too.

    Example:
        >>> build_method("selection", {"resample": 2})
        ParameterSelection(probabilities=None, resample=2)
    """
    cls = method_class(name)
    params = dict(params or {})
    declared = {p.name: p for p in cls.parameters()}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise MergeError(
            f"method {name!r} takes {_listing(declared) or 'no parameters'}, not "
            f"{', '.join(unknown)}"
        )
    for key, value in params.items():
        problem = _type_problem(declared[key].type, value)
        if problem:
            raise MergeError(f"method {name!r}: {key} must be {problem}, got {value!r}")
    values = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in params.items()}
    method = cls(**values)
    method.check_parameters()
    return method


def _listing(declared: Mapping[str, Any]) -> str:
    return ", ".join(declared)


def _type_problem(expected: Any, value: Any) -> str | None:
    """What ``value`` should be when it does not fit ``expected`` (a type hint), else ``None``."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        problems = [_type_problem(o, value) for o in options if o is not type(None)]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if origin is typing.Literal:
        choices = typing.get_args(expected)
        return None if value in choices else f"one of {list(choices)}"
    if origin is not None and issubclass(origin, Sequence):
        (item,) = typing.get_args(expected) or (Any,)
        is_list = isinstance(value, Sequence) and not isinstance(value, str)
        if is_list and all(_type_problem(item, v) is None for v in value):
            return None
        return f"a list of {_describe(item)}s"
    if expected is bool:
        return None if isinstance(value, bool) else "true or false"
    if expected is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if expected is str:
        return None if isinstance(value, str) else "a string"
    return None


def _describe(item: Any) -> str:
    return {float: "number", int: "integer", str: "string", bool: "boolean"}.get(item, str(item))
