"""The lock file that ``scripts/dev.py`` installs from agrees with the package's ranges."""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
LOCKED_EXTRAS = ("dev", "examples")  # what scripts/dev.py installs: .[dev,examples]


def pins() -> dict[str, str]:
    lines = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    pairs = [line.split("==") for line in lines]
    assert all(len(pair) == 2 for pair in pairs), "every lock line is NAME==VERSION"
    return {canonicalize_name(name): version for name, version in pairs}


def installed_requirements() -> list[Requirement]:
    """The package's requirements that ``.[dev,examples]`` installs (from its metadata)."""
    wanted = []
    for text in requires("lightning_selmerge") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in LOCKED_EXTRAS):
            wanted.append(requirement)
    return wanted


# Never pinned: an existing torch is never replaced, and triton is the one its CUDA build pins.
TORCHS_OWN = ("torch", "triton")


def test_lock_pins_every_requirement_within_its_range_except_torch_and_triton() -> None:
    locked = pins()
    for requirement in installed_requirements():
        name = canonicalize_name(requirement.name)
        if name in TORCHS_OWN:
            assert name not in locked
            continue
        assert name in locked, f"{name} is not in {LOCK.name}: run scripts/dev.py lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={locked[name]} outside {requirement}"
        )


def test_lock_names_the_python_it_was_made_with() -> None:
    assert re.search(r"^# python \d+\.\d+$", LOCK.read_text(), re.M)
