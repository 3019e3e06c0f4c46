"""pyproject.toml maps the repository's folders onto the `qnext` namespace: every folder that holds Python code is
listed as a package (a folder left out would be missing from the wheel), and none of the top-level folders has an
__init__.py (one would let `kernels/` shadow Hugging Face's `kernels` when running from the repository root)."""

from __future__ import annotations

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_code_folder_is_a_listed_package() -> None:
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setup["package-dir"]
    listed = set(setup["packages"])
    found = set()
    for package, folder in mapping.items():
        for init_or_module in (REPO / folder).rglob("*.py"):
            rel = init_or_module.parent.relative_to(REPO / folder)
            if "__pycache__" not in rel.parts:
                found.add(".".join([package, *rel.parts]))
    assert found == listed, f"in the tree, not listed: {sorted(found - listed)}; listed, not found: " \
                            f"{sorted(listed - found)}"


def test_top_level_folders_are_not_importable_packages() -> None:
    for folder in ("kernels", "worker", "qnext_rpc"):
        assert not (REPO / folder / "__init__.py").exists(), folder
