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


def test_bench_scripts_shadow_no_installed_module() -> None:
    """Python puts a script's folder first on sys.path: a bench/kernels.py hid Hugging Face's `kernels` from
    transformers inside every benchmark. No benchmark may carry the name of an importable top-level module."""
    import importlib.util
    import sys
    bench = str(REPO / "bench")
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in ("", bench, str(REPO))]
    try:
        clashes = [p.name for p in (REPO / "bench").glob("*.py")
                   if p.stem != "__init__" and importlib.util.find_spec(p.stem) is not None]
    finally:
        sys.path[:] = saved
    assert not clashes, clashes
