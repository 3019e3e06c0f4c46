"""Row argmax of 16-bit logits on a CPU in one C call (`argmax.c`): torch.argmax(dim=-1)'s indices (the first
maximum; a NaN counts as the maximum; +0 and -0 equal) without widening the logits to fp32 first.

The sampler's greedy rows read it (worker/sampler.py row_argmax): at 16 rows x 151,936 bf16 logits the widening
and block maxima took 0.7-0.85 ms of a ~12 ms decode step on the 2-core box, this 0.27-0.30 ms on one thread and
0.15-0.17 with the rows split over two (torch's OpenMP threads, kernels/cpu openmp_threads). Float32 logits keep
the torch way (as fast there). tests/test_cpu_argmax.py holds it to torch.argmax."""

from __future__ import annotations

import ctypes
import functools

import torch

from qnext.kernels import cpu

NAN_ABOVE = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}  # |bits| above this are NaN


@functools.cache
def _entry() -> ctypes._CFuncPtr:
    fn = cpu.library()[0].row_argmax_16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p,
                   ctypes.c_int64]
    fn.restype = None
    return fn


def runs(x: torch.Tensor) -> bool:
    """Whether row_argmax takes x: 2-D 16-bit float logits on a CPU, columns contiguous, the library built."""
    return x.dtype in NAN_ABOVE and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1 and cpu.runs(x)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) as int64 [rows], for an x that runs() accepts."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _entry()(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), NAN_ABOVE[x.dtype], out.data_ptr(),
             cpu.openmp_threads() if x.shape[0] > 1 else 1)
    return out


__all__ = ["row_argmax", "runs"]
