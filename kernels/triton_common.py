"""Triton helpers shared by the kernels that multiply tiles (attention, MoE), and what they need to know about
the Triton interpreter that the CPU tests run them under."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (numpy on the CPU), which has two gaps the kernels work
    around behind a constexpr: it cannot run a `for` loop to a runtime bound (numpy refuses int() of its
    one-element scalars), and its tl.dot multiplies bfloat16 tiles as their raw uint16 bits."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """tl.dot(a, b) with fp32 accumulation. Under the interpreter bf16 tiles go to fp32 first: exact (bf16
    products fit fp32), so the result is what the GPU's bf16 MMA computes. (FP8 tiles it handles itself.)"""
    if INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)
