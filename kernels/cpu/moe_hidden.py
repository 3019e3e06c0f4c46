"""The rows between a small MoE block's two packed GEMMs on a CPU in one C call (`moe_hidden.c`): the routed
experts' h = silu(gate) * up times their routing weights (0 for the unrouted) and the shared expert's gated
h, from the first GEMM's output and the routing. worker/cpu_linear.py PackedDenseMoE calls it for bf16 rows; its
reference is PackedDenseMoE.hidden_reference (torch), and tests/test_cpu_moe_hidden.py holds the two together.
When it runs otherwise: the package's docstring (kernels/cpu/__init__.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qnext.kernels import cpu

MAX_EXPERTS = 256  # the C routing row lives on the stack; the dense block takes far fewer (DENSE_MAX_EXPERTS)


class _Args(ctypes.Structure):
    """struct moe_hidden_args of moe_hidden.c, field for field."""

    _fields_ = [("rows", ctypes.c_int64), ("E", ctypes.c_int64), ("I", ctypes.c_int64), ("Is", ctypes.c_int64),
                ("top_k", ctypes.c_int64), ("first", ctypes.c_void_p), ("first_stride", ctypes.c_int64),
                ("s_gate", ctypes.c_int64), ("s_up", ctypes.c_int64), ("s_weight", ctypes.c_int64),
                ("gate", ctypes.c_int64), ("up", ctypes.c_int64),
                ("ids", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("out", ctypes.c_void_p)]


@functools.cache
def _entry() -> ctypes._CFuncPtr:
    return cpu.entry("moe_hidden_bf16", _Args)


def runs(first: torch.Tensor, num_experts: int) -> bool:
    """Whether the C pass takes this first-GEMM output: 2-D bf16 rows with contiguous columns on a CPU."""
    return (first.dtype == torch.bfloat16 and first.dim() == 2 and first.stride(1) == 1
            and num_experts <= MAX_EXPERTS and cpu.runs(first))


def moe_hidden(first: torch.Tensor, offsets: tuple[int, int, int, int, int], sizes: tuple[int, int, int],
               weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T, E * I + Is] bf16: the second GEMM's input. first [T, *] (runs() holds); offsets: the columns of the
    shared gate, shared up, shared-expert gate, experts' gate, experts' up in a first row; sizes (E, I, Is);
    weights [T, k] fp32 and ids [T, k] int64, the routing."""
    E, I, Is = sizes
    T, k = ids.shape
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and weights.shape == ids.shape
    weights, ids = weights.contiguous(), ids.contiguous()
    out = torch.empty(T, E * I + Is, dtype=torch.bfloat16)
    args = _Args(T, E, I, Is, k, first.data_ptr(), first.stride(0), *offsets, ids.data_ptr(), weights.data_ptr(),
                 out.data_ptr())
    rc = _entry()(ctypes.byref(args))
    if rc != 0:
        raise ValueError(f"moe_hidden: a routed expert id outside [0, {E}) (code {rc})")
    return out


__all__ = ["moe_hidden", "runs"]
