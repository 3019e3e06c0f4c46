"""What a benchmark ran on: the git commit and the files modified in the working tree."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        return {"commit": head, "modified": [line[3:] for line in dirty if line.strip()]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "modified": []}


def git_line(state: dict[str, Any]) -> str:
    """'git <commit>', and the modified files if any: for a benchmark's header line."""
    return f"git {state['commit']}" + (f" (modified: {', '.join(state['modified'])})" if state["modified"] else "")
