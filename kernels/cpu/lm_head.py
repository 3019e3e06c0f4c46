"""The bf16 LM head on a CPU with AVX512-BF16, in one C call (`lm_head.c`): logits of the sampled rows against
the [V, H] head weight, `vdpbf16ps` dot products on torch's OpenMP threads. worker/cpu_linear.py's PackedLinear
calls it for a vocabulary-wide bf16 linear; `reference` is the instruction's arithmetic in torch, and
tests/test_cpu_lm_head.py holds the two together bit for bit. When it runs otherwise: the package's docstring
(kernels/cpu/__init__.py), and only where the library was built with AVX512-BF16 (`available`).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qnext.kernels import cpu


class _Args(ctypes.Structure):
    """struct lm_head_args of lm_head.c, field for field."""

    _fields_ = [("rows", ctypes.c_int64), ("hidden", ctypes.c_int64), ("vocab", ctypes.c_int64),
                ("x", ctypes.c_void_p), ("packed", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("threads", ctypes.c_int64)]


def pack(weight: torch.Tensor) -> torch.Tensor:
    """What lm_head.c reads for a bf16 weight [V, H] (H even): blocks of 16 vocabulary rows, each [H / 2][16][2]
    (a pair of hidden columns of 16 rows per 64 bytes), zero rows past V."""
    assert weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0, (weight.dtype, weight.shape)
    return cpu.vocab_blocks(weight, 2)


@functools.cache
def available() -> bool:
    """Whether the library is built here with AVX512-BF16 (it is built for this CPU: build.py)."""
    lib = cpu.library()[0]
    if lib is None:
        return False
    lib.lm_head_available.restype = ctypes.c_int
    return lib.lm_head_available() == 1


@functools.cache
def _entry() -> ctypes._CFuncPtr:
    return cpu.entry("lm_head", _Args)


def runs(x: torch.Tensor) -> bool:
    """Whether the C head takes these rows: [rows, H] bf16 on a CPU, H even, the library built with AVX512-BF16."""
    return (x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[1] % 2 == 0 and cpu.runs(x)
            and available())


def lm_head(x: torch.Tensor, packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] bf16 logits of x [rows, H] (runs(x) holds) against `pack(weight)`."""
    H = x.shape[1]
    assert packed.shape[1:] == (H // 2, cpu.VOCAB_BLOCK, 2) and packed.shape[0] * cpu.VOCAB_BLOCK >= vocab, \
        (packed.shape, H, vocab)
    x = x.contiguous()
    out = torch.empty(x.shape[0], vocab, dtype=torch.bfloat16)
    args = _Args(x.shape[0], H, vocab, x.data_ptr(), packed.data_ptr(), out.data_ptr(), cpu.openmp_threads())
    status = _entry()(ctypes.byref(args))
    if status == 1:
        raise MemoryError("lm_head: no scratch memory")
    if status != 0:
        raise RuntimeError("lm_head: the library was built without AVX512-BF16 (check runs() first)")
    return out


def _flush_denormals(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(t), t)


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """lm_head.c's arithmetic in torch, for bf16 x [rows, H] and weight [V, H] (H even) whose products are fp32
    normals or 0: an fp32 sum from 0 over the hidden pairs in order, the odd column's product added before the
    even one's, each addition rounded (fp32, nearest even), denormal inputs and sums read as 0; then bf16. One
    [rows, V] addition per hidden column: a test's reference, not a fast path."""
    xf, wf = _flush_denormals(x.float()), _flush_denormals(weight.float())
    acc = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32)
    for k in range(0, x.shape[1], 2):
        for col in (k + 1, k):
            acc = _flush_denormals(acc + xf[:, col, None] * wf[None, :, col])
    return acc.to(torch.bfloat16)


__all__ = ["available", "lm_head", "pack", "reference", "runs"]
