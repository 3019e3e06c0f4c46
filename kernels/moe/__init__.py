"""Routed experts of the sparse MoE block (FACTS §3.9): the Triton grouped GEMMs on CUDA (`triton_moe.py`), the
torch reference elsewhere. The router is torch everywhere (why: triton_moe.py). triton is imported only when a
kernel runs."""

import torch

from kernels.dispatch import use_triton
from kernels.moe import reference
from kernels.moe.reference import route


def fused_moe(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] fp32 routing weights
    ids: torch.Tensor,  # [T, k] expert ids
    w_gate: torch.Tensor,  # [E, I, H]
    w_up: torch.Tensor,  # [E, I, H]
    w_down: torch.Tensor,  # [E, H, I]
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # FP8 block scales of the three
) -> torch.Tensor:  # [T, H] in x's dtype
    """y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])) with e = ids[t, j]; FP8 weights
    take activations quantised per token per 128-group (W8A8, as Fp8Linear)."""
    if not use_triton(x):
        return reference.fused_moe(x, weights, ids, w_gate, w_up, w_down, scales)
    from kernels.moe.triton_moe import fused_moe_fwd
    return fused_moe_fwd(x if x.stride(-1) == 1 else x.contiguous(), weights, ids, w_gate, w_up, w_down, scales)


__all__ = ["route", "fused_moe"]
