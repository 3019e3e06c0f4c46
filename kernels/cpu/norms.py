"""Zero-centred RMSNorm rows on a CPU in one C call (`norms.c`), with the residual add before it where the layer
has one: kernels/norms dispatches here for CPU tensors (torch's composite rms_norm is ~25-30 us a call however few
the rows; with this, a one-sequence decode step 1.05x faster on the 2-core box). The reference is
kernels/norms/reference.py; tests/test_cpu_norms.py holds the two together. Every row count takes it, so a row's
result never depends on its batch; when it runs otherwise: the package's docstring (kernels/cpu/__init__.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qnext.kernels import cpu
from qnext.kernels.cpu import DTYPE_NAMES


class _Args(ctypes.Structure):
    """struct rms_norm_args of norms.c, field for field."""

    _fields_ = [("rows", ctypes.c_int64), ("dim", ctypes.c_int64),
                ("x", ctypes.c_void_p), ("x_stride", ctypes.c_int64),
                ("residual", ctypes.c_void_p), ("residual_stride", ctypes.c_int64),
                ("weight", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("out", ctypes.c_void_p), ("sum_out", ctypes.c_void_p)]


@functools.cache
def _entries() -> dict[torch.dtype, ctypes._CFuncPtr]:
    """{activation dtype: entry point}."""
    return {act: cpu.entry(f"rms_norm_zc_{a}", _Args) for act, a in DTYPE_NAMES.items()}


def _row_stride(t: torch.Tensor) -> int | None:
    """The row stride of t viewed as [rows, D] without a copy (columns contiguous), or None when it has none."""
    if t.is_contiguous():
        return t.shape[-1]
    return t.stride(0) if t.dim() == 2 and t.stride(1) == 1 else None


def runs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether the C norm takes x (and residual): rows with contiguous columns (contiguous, or 2-D with a row
    stride), the weight [D] contiguous in x's dtype. Called per norm, so the cheap tests come first."""
    return (weight.dtype == x.dtype and x.device.type == "cpu" and x.dtype in DTYPE_NAMES and x.numel() > 0
            and weight.is_contiguous() and weight.shape == x.shape[-1:] and _row_stride(x) is not None
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                      and _row_stride(residual) is not None))
            and cpu.runs(x))


def rms_norm_zero_centred(x: torch.Tensor, weight: torch.Tensor, eps: float,
                          residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x / rms(x) * (1 + weight), None), or with a residual (norm(h), h) for h = x + residual; for tensors
    runs() accepts. Results are new contiguous tensors shaped like x."""
    dim = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype)
    if residual is None:
        total, res_ptr, res_stride, total_ptr = None, 0, 0, 0
    else:
        total = torch.empty(x.shape, dtype=x.dtype)
        res_ptr, res_stride, total_ptr = residual.data_ptr(), _row_stride(residual), total.data_ptr()
    args = _Args(x.numel() // dim, dim, x.data_ptr(), _row_stride(x), res_ptr, res_stride, weight.data_ptr(), eps,
                 out.data_ptr(), total_ptr)
    if _entries()[x.dtype](ctypes.byref(args)) != 0:
        raise MemoryError("rms_norm: no scratch memory")
    return out, total


__all__ = ["rms_norm_zero_centred", "runs"]
