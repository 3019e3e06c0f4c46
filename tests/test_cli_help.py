"""Every console script's --help runs (exit 0) and shows the flags' defaults, each once, through the one shared
formatter (worker/cli_help.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: name -> module:function."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))


def test_every_script_is_checked():
    assert set(scripts()) == {"qnext-batch", "qnext-validate", "qnext-make-tiny", "qnext-serve", "qnext-generate",
                              "qnext-health", "qnext-bench"}
    assert all(entry.endswith(":main") for entry in scripts().values())


@pytest.mark.parametrize("name", sorted(scripts()))
def test_help_shows_defaults(name):
    module = scripts()[name].partition(":")[0]
    # the entry point itself (main), as the console script calls it
    proc = subprocess.run([sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main(['--help']))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"usage: {name} "), out
    assert "(default:" in out, out
    flat = " ".join(out.split())  # help text wrapped across lines, joined again
    assert "(default: None)" not in flat and "(default: False)" not in flat and "(default: [])" not in flat, out
    assert not re.search(r"\(default[^)]*\)\s*\(default", flat), out  # never twice for one flag
    assert not re.search(r"\(default [^:]", flat), out  # the old hand-written "(default 1)" style
