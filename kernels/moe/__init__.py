"""Router and routed experts of the sparse MoE block (docs/model.md §6): the Triton kernels on CUDA
(`triton_router.py`, `triton_align.py`, `triton_moe.py`), the torch references elsewhere. The shared expert is an
ordinary MLP in the model. triton is imported only when a kernel runs."""

import torch
import torch.nn.functional as F

from qnext.kernels.dispatch import use_triton
from qnext.kernels.moe import reference


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router_weight [E, H] -> (weights fp32 [T, k], expert ids int64 [T, k]): softmax over the experts
    in fp32, the top k, renormalised to sum to 1 when asked."""
    return route_logits(F.linear(x, router_weight), top_k, renormalize)


def route_logits(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` from the router's logits [T, E] (a model that computes them in a fused projection)."""
    if not use_triton(logits):
        return reference.route_logits(logits, top_k, renormalize)
    from qnext.kernels.moe.triton_router import topk_softmax_fwd
    return topk_softmax_fwd(logits, top_k, renormalize)


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
    from qnext.kernels.moe.triton_moe import fused_moe_fwd
    return fused_moe_fwd(x if x.stride(-1) == 1 else x.contiguous(), weights, ids, w_gate, w_up, w_down, scales)


__all__ = ["route", "route_logits", "fused_moe"]
