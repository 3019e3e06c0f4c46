"""What several benchmarks share: random prompts below the special token ids, the relative error of two tensors,
a device synchronisation, where a result file goes by default, and writing it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FIRST_SPECIAL_ID = 151643  # <|endoftext|>: prompts draw from the ordinary BPE ids below it


def random_prompts(n: int, length: int, seed: int, high: int = FIRST_SPECIAL_ID) -> list[list[int]]:
    """`n` prompts of `length` token ids drawn uniformly from [0, high), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, length), generator=g).tolist()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA step's wall time ends here, as the engine's steps do)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_out(given: Path | None, name: str) -> Path:
    """--out if given, else $OUT/name where $OUT is set (the device runs' result folder), else ./name."""
    return given or (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else Path(name))


def write_json(path: Path, doc: object, indent: int = 1) -> None:
    """`doc` as JSON at `path` (its folder made), through a temp file: a run killed mid-write leaves the previous
    complete file. Values JSON has no type for are written as their str()."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent, default=str) + "\n")
    tmp.replace(path)
