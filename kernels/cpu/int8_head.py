"""The int8 LM head MTP drafts are drawn from, on a CPU in one C call (`int8_head.c`): logits of a few hidden rows
against int8 weights with one scale per vocabulary row, as integer dot products on torch's OpenMP threads.
worker/draft_head.py calls it; `reference` is the same arithmetic in torch (integer matmuls, then the same three
float operations), and tests/test_cpu_int8_head.py holds the two together bit for bit. When it runs otherwise:
the package's docstring (kernels/cpu/__init__.py).
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from qnext.kernels import cpu

MAX_HIDDEN = 65536  # the int32 sums stay exact up to here (int8_head.c)


class _Args(ctypes.Structure):
    """struct int8_head_args of int8_head.c, field for field."""

    _fields_ = [("rows", ctypes.c_int64), ("hidden", ctypes.c_int64), ("vocab", ctypes.c_int64),
                ("h", ctypes.c_void_p), ("bf16", ctypes.c_int64), ("packed", ctypes.c_void_p),
                ("row_sums", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("threads", ctypes.c_int64)]


class PackedInt8Weight(NamedTuple):
    """What int8_head.c reads: q [V, H] int8 in blocks of 16 vocabulary rows, each [ceil(H / 4)][16][4] (zero
    past V and H), every row's sum of q, and the fp32 scales [V]."""

    packed: torch.Tensor
    row_sums: torch.Tensor
    scale: torch.Tensor
    vocab: int
    hidden: int


def pack(qweight: torch.Tensor, scale: torch.Tensor) -> PackedInt8Weight:
    """The packed form of q [V, H] int8 and its per-row scales [V]."""
    V, H = qweight.shape
    assert qweight.dtype == torch.int8 and scale.shape == (V,) and H <= MAX_HIDDEN
    packed = cpu.vocab_blocks(qweight, 4)
    row_sums = torch.zeros(packed.shape[0] * cpu.VOCAB_BLOCK, dtype=torch.int32)
    row_sums[:V] = qweight.sum(dim=1, dtype=torch.int32)
    return PackedInt8Weight(packed, row_sums, scale.float().contiguous(), V, H)


@functools.cache
def _entry() -> ctypes._CFuncPtr:
    return cpu.entry("int8_head", _Args)


def runs(h: torch.Tensor) -> bool:
    """Whether the C head takes these rows: [rows, H] fp32 / bf16 on a CPU."""
    return h.dim() == 2 and h.shape[1] <= MAX_HIDDEN and cpu.runs(h)


def int8_head(h: torch.Tensor, weight: PackedInt8Weight) -> torch.Tensor:
    """[rows, V] logits in h's dtype (runs(h) holds; h [rows, H])."""
    assert h.shape[1] == weight.hidden, (h.shape, weight.hidden)
    h = h.contiguous()
    out = torch.empty(h.shape[0], weight.vocab, dtype=h.dtype)
    args = _Args(h.shape[0], weight.hidden, weight.vocab, h.data_ptr(), int(h.dtype == torch.bfloat16),
                 weight.packed.data_ptr(), weight.row_sums.data_ptr(), weight.scale.data_ptr(), out.data_ptr(),
                 cpu.openmp_threads())
    if _entry()(ctypes.byref(args)) != 0:
        raise MemoryError("int8_head: no scratch memory")
    return out


def reference(h: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8_head.c's arithmetic in torch, for finite h [rows, H]: the activations as 16-bit integers split into
    a high and a low byte, exact integer dot products with q, then the same float operations in the same order."""
    x = h.float()
    m = x.abs().amax(dim=1, keepdim=True)
    # a tensor divided, not the scalar 32767 / m: torch computes that as 32767 * (1 / m), another rounding
    inv = torch.where(m > 0, torch.full_like(m, 32767.0) / m, torch.zeros_like(m))
    a = (x * inv).round().to(torch.int64)  # round half to even, as lrintf
    q = qweight.to(torch.int64).T
    hi, lo = a >> 8, a & 0xFF  # a = 256 * hi + lo
    t = 256.0 * (hi @ q).float() + (lo @ q).float()
    return ((t * scale.float()) * (m / 32767.0)).to(h.dtype)


__all__ = ["PackedInt8Weight", "int8_head", "pack", "reference", "runs"]
