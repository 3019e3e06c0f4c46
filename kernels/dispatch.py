"""Which implementation of an op runs: the Triton kernel or the torch reference.

Triton runs for tensors on CUDA unless `QNEXT_KERNELS=reference` forces the references everywhere (to bisect a
numerical problem, or on a GPU where a kernel misbehaves). The variable is read at each call, not at import, so
a test or a running process can flip it. Tests run the Triton kernels on CPU tensors under `TRITON_INTERPRET=1`
inside `force_triton()`, which wins over the variable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENV_VAR = "QNEXT_KERNELS"
_MODES = ("auto", "reference")
_forced_triton = False


def kernels_mode() -> str:
    """`auto` (Triton on CUDA, references elsewhere) or `reference` (references everywhere)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(_MODES)} (unset means auto)")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on `t` should run its Triton kernel. float64 always takes the reference: the kernels
    compute in fp32, and fp64 runs exist to check exactness."""
    if t.dtype == torch.float64:
        return False
    return _forced_triton or (t.is_cuda and kernels_mode() == "auto")


@contextmanager
def force_triton() -> Iterator[None]:
    """Run the Triton kernels whatever the device (CPU tensors need TRITON_INTERPRET=1 set before triton is
    imported). For tests; not thread-safe."""
    global _forced_triton
    previous, _forced_triton = _forced_triton, True
    try:
        yield
    finally:
        _forced_triton = previous
