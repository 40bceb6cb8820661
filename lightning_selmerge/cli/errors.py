"""What the command line does with an exception: a user mistake gets one line, a bug its traceback.

A *user mistake* is an error in what the user gave (a config value, a path, a merge input):
``MergeError``, ``ReportError``, Lightning's ``MisconfigurationException``, argument parsing
errors, missing files, and the ``ValueError`` / ``TypeError`` raised by this package's own
checks or by jsonargparse while it builds the configured classes. jsonargparse buries the real
sentence in a "Does not validate against any of the Union subtypes" report;
:func:`user_message` digs it out.

Example:
    >>> buried = '''Does not validate against any of the Union subtypes
    ... Subtypes: [<class 'str'>, <class 'Strategy'>]
    ... Errors:
    ...   - Expected a <class 'str'>
    ...   - DataOrderEnsemble: num_replicas=1 trains a single model; use num_replicas >= 2.
    ... Given value type: <class 'Namespace'>
    ... Given value: Namespace(num_replicas=1)'''
    >>> user_message(ValueError(buried))
    'DataOrderEnsemble: num_replicas=1 trains a single model; use num_replicas >= 2.'
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DEBUG_ENV",
    "DEBUG_FLAG",
    "class_names",
    "is_user_mistake",
    "unknown_class",
    "user_message",
]

#: command-line flag (anywhere after the subcommand) that shows the traceback of a user mistake.
DEBUG_FLAG = "--debug"
#: environment variable that does the same when set to 1.
DEBUG_ENV = "SELMERGE_DEBUG"

_PACKAGE = Path(__file__).resolve().parent.parent
_UNION = "Does not validate against any of the Union subtypes"
_TYPE_MISMATCH = re.compile(r"^(Expected a |Not a valid subclass|Problem with given class_path)")
_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":\s*\n?(?P<rest>.*)$', re.DOTALL)
_GOT_VALUE = re.compile(r"\. Got value: .*$", re.DOTALL)
_NESTED_ARG = re.compile(r"^\s*Given value: NestedArg\(key='(?P<name>[^']*)'", re.MULTILINE)
_CLASS_PATH = re.compile(r"Problem with given class_path '(?:[\w.]*\.)?(?P<cls>\w+)'")
_NO_CLASS = re.compile(r"^\s*- Expected a dot import path string: (?P<name>\S+)$", re.MULTILINE)
_BASE_CLASS = re.compile(r"\b(?P<path>(?:[a-z_]\w*\.)+[A-Z]\w*)\b")
_MISTAKE_CLASSES = frozenset(
    {"MisconfigurationException", "MergeError", "ReportError", "ArgumentError"}
)


def is_user_mistake(err: BaseException) -> bool:
    """Whether ``err`` is a mistake in the user's input (True) rather than a bug (False)."""
    if isinstance(err, argparse.ArgumentError):
        return True
    if any(cls.__name__ in _MISTAKE_CLASSES for cls in type(err).__mro__):
        return True
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return True
    if isinstance(err, (ValueError, TypeError)):
        return _raised_by_our_checks(err)
    return False


def user_message(err: BaseException) -> str:
    """The sentence of ``err`` that names the problem and its fix, on one line when it can be."""
    text = str(err).strip() or type(err).__name__
    return _innermost(text)


def _raised_by_our_checks(err: BaseException) -> bool:
    """Raised in this package or by jsonargparse (a configured class refused its arguments)."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    where = Path(last.tb_frame.f_code.co_filename).resolve()
    return where.is_relative_to(_PACKAGE) or "jsonargparse" in where.parts


def _innermost(text: str) -> str:
    key = None
    match = _PARSER_KEY.match(text)
    if match:
        key, text = match["key"], _dedent_tail(match["rest"])
    if key and _UNION in text and (item := _list_item_message(key, text)):
        return item
    if key and (no_class := _unknown_class_message(key, text)):
        return no_class
    if _UNION in text:
        text = _union_message(text)
    text = _GOT_VALUE.sub("", text).strip()
    if key and key not in text:
        text = f"{key}: {text}"
    return text


def class_names(base: type) -> list[str]:
    """The names of ``base``'s imported subclasses: the short class names the CLI takes."""
    seen, todo = set(), [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return sorted({sub.__name__ for sub in seen if not sub.__name__.startswith("_")})


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` naming the known names closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def unknown_class(key: str, name: str, known: Iterable[str]) -> str:
    """``KEY: no class NAME``, the known names closest to it, and the way to give a class."""
    known = list(known)
    hint = did_you_mean(name, known)
    listed = f": {', '.join(known)}" if 0 < len(known) <= 8 else ""
    return (
        f"{key}: no class named {name!r}{hint}; give a class name this command knows{listed}, "
        "or a full import path (package.module.Class)."
    )


def _unknown_class_message(key: str, text: str) -> str | None:
    """A class name jsonargparse could not import (``--model=CausalLMModul``), named as such."""
    missing = _NO_CLASS.search(text)
    subtypes = re.search(r"^\s*Subtypes: \[(?P<types>.*)\]\s*$", text, re.MULTILINE)
    if missing is None or subtypes is None:
        return None
    known: set[str] = set()
    for path in dict.fromkeys(m["path"] for m in _BASE_CLASS.finditer(subtypes["types"])):
        module, _, name = path.rpartition(".")
        try:
            base = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(base, type) and not module.startswith("collections"):
            known.update(class_names(base))
    return unknown_class(key, missing["name"], sorted(known))


def _list_item_message(key: str, text: str) -> str | None:
    """What ``--KEY.init_args.NAME=VALUE`` on a list option (``trainer.callbacks``) did wrong.

    jsonargparse hands such a flag to the list's last item only, so an index or a NAME that item
    lacks is refused with a bare ``NestedArg(...)``; this names the item and the way out.
    """
    nested = _NESTED_ARG.search(text)
    if nested is None or not re.search(r"^\s*Subtypes: \[list\[", text, re.MULTILINE):
        return None
    name = nested["name"]
    owner = _CLASS_PATH.search(text)
    last = f"the last item ({owner['cls']})" if owner else "the last item"
    restate = f"a later --config that restates {key} changes any item"
    if re.match(r"\d+\.", name):
        return (
            f"{key}: {name!r} picks a list item by index, which the command line does not take; "
            f"--{key}.init_args.NAME=VALUE sets NAME of {last}, and {restate}."
        )
    return (
        f"{key}: --{key}.init_args.NAME=VALUE sets NAME of {last}, which takes no {name!r}; "
        f"{restate}."
    )


def _dedent_tail(text: str) -> str:
    """Dedent every line but the first (jsonargparse indents the lines after a key)."""
    first, _, rest = text.partition("\n")
    return first + ("\n" + textwrap.dedent(rest) if rest else "")


def _union_message(text: str) -> str:
    """The useful errors of a union report, else "got VALUE, expected one of TYPES"."""
    errors = _union_errors(text)
    useful = [_innermost(e) for e in errors if not _TYPE_MISMATCH.match(e)]
    useful = [e for e in dict.fromkeys(useful) if e]
    if useful:
        return "; ".join(useful)
    subtypes = re.search(r"^\s*Subtypes: \[(?P<types>.*)\]\s*$", text, re.MULTILINE)
    given = re.search(r"^\s*Given value: (?P<value>.*)$", text, re.MULTILINE)
    names = re.findall(r"<class '(?:[\w.]*\.)?(\w+)'>", subtypes["types"]) if subtypes else []
    expected = ", ".join("None" if n == "NoneType" else n for n in names) or "another type"
    value = given["value"] if given else "this value"
    return f"got {value!r}, expected one of: {expected}"


def _union_errors(text: str) -> list[str]:
    """The entries of the ``Errors:`` list of a union report (nested reports kept whole)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Errors:"), None)
    if start is None:
        return []
    indent = len(lines[start]) - len(lines[start].lstrip())
    entries: list[list[str]] = []
    for line in lines[start + 1 :]:
        depth = len(line) - len(line.lstrip())
        if line.strip() and depth <= indent:
            break  # "Given value type: ..." closes the list
        if line.lstrip().startswith("- ") and depth == indent + 2:
            entries.append([line.lstrip()[2:]])
        elif entries:
            entries[-1].append(line[indent + 4 :])
    return ["\n".join(entry).strip() for entry in entries]
