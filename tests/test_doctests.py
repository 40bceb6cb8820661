"""Every module's ``>>>`` examples run, and pass (doctest, with ELLIPSIS)."""

import doctest
import importlib
import pkgutil
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
