"""The dependency floors in pyproject.toml are at least the versions the code is known to need.

Each entry below names what the code relies on and the first release that has it (how it was checked is in
docs/ARCHITECTURE.md, "Dependency floors"). Lowering a floor below one of these needs a new check, not an edit
here. The installed versions must satisfy the declared floors too (a test run on an older package proves nothing
about the floor).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

NEEDED = {
    # package: (first version that works, what needs it)
    "transformers": ("4.56", "from_pretrained(dtype=...) / from_config(dtype=...) (4.55 raises TypeError)"),
    "safetensors": ("0.4.3", "transformers 4.56's own floor"),
    "datasets": ("4.7", "an empty data file reported as ValueError (tests/datasets)"),
}


def _floors() -> dict[str, Version]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        req = Requirement(dep)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            floors[req.name.lower()] = max(lows)
    return floors


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_floor_is_at_least_what_the_code_needs(package):
    floors = _floors()
    needed, why = NEEDED[package]
    assert package in floors, f"pyproject.toml declares no lower bound for {package}"
    assert floors[package] >= Version(needed), f"{package}>={floors[package]} is below {needed}, needed for {why}"


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_installed_version_meets_the_floor(package):
    installed = Version(re.sub(r"\+.*", "", importlib.metadata.version(package)))
    assert installed >= _floors()[package]
