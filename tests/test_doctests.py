"""Every module's ``>>>`` examples run, and pass (doctest, with ELLIPSIS)."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import lightning_selmerge

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lightning_selmerge.__path__, "lightning_selmerge.")
    if not info.name.endswith("__main__")
)


def test_every_module_is_found():
    assert "lightning_selmerge.merging.methods.selection" in MODULES
    assert "lightning_selmerge.hf.data" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_run(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the examples use repository-relative paths
    module = importlib.import_module(name)
    source = Path(module.__file__).read_text()
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, name
    if ">>>" in source:
        assert result.attempted > 0, f"{name} has >>> examples that doctest does not find"


def test_the_merge_callbacks_method_examples_name_real_classes():
    from lightning_selmerge import merging
    from lightning_selmerge.ensemble import SelectionMergeCallback

    doc = SelectionMergeCallback.__doc__ or ""
    method_doc = doc.split("method:", 1)[1].split("resample, weights", 1)[0]
    named = re.findall(r"``(\w+)\(", method_doc)
    assert named
    for name in named:
        assert hasattr(merging, name), f"SelectionMergeCallback's docstring names {name}"
