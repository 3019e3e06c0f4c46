"""Top-k softmax routing and the routed experts of a sparse MoE block (docs/model.md §6), plain torch.

The shared expert and its sigmoid gate are an ordinary gated MLP in the model; only the routed part is here.
Expert weights are stacked per projection: w_gate, w_up [E, I, H], w_down [E, H, I]; for FP8 each has a
block scale tensor [E, ceil(rows/128), ceil(cols/128)], and each projection is W8A8 like `Fp8Linear` (its input
quantised per token per 128-group), which is what the Triton kernels compute.
"""

import torch
import torch.nn.functional as F

from qnext.kernels.fp8.reference import fp8_block_linear


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router_weight [E, H] -> (weights fp32 [T, k], expert ids int64 [T, k])."""
    return route_logits(F.linear(x, router_weight), top_k, renormalize)


def route_logits(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` from the router's logits [T, E]."""
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def _expert_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, e: int) -> torch.Tensor:
    return F.linear(x, w[e]) if scale is None else fp8_block_linear(x, w[e], scale[e])


# Up to this many experts (the tiny test/default models, not the real 512) every expert runs on every token as
# three batched matmuls, and routing weights of zero drop the unselected ones: a few large ops instead of a
# Python loop of small ones. Decided by the model alone, so a token's arithmetic does not depend on the batch.
DENSE_MAX_EXPERTS = 32


def _dense_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate: torch.Tensor,
               w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    E = w_gate.shape[0]
    xe = x.unsqueeze(0).expand(E, -1, -1)  # [E, T, H]
    h = F.silu(torch.bmm(xe, w_gate.transpose(1, 2))) * torch.bmm(xe, w_up.transpose(1, 2))  # [E, T, I]
    y = torch.bmm(h, w_down.transpose(1, 2))  # [E, T, H]
    ct = torch.promote_types(x.dtype, torch.float32)
    route_w = torch.zeros(x.shape[0], E, dtype=ct, device=x.device).scatter_(1, ids, weights.to(ct))  # [T, E]
    return torch.einsum("te,eth->th", route_w, y.to(ct)).to(x.dtype)


def fused_moe(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] fp32
    ids: torch.Tensor,  # [T, k]
    w_gate: torch.Tensor,  # [E, I, H]
    w_up: torch.Tensor,  # [E, I, H]
    w_down: torch.Tensor,  # [E, H, I]
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # FP8 block scales of the three
) -> torch.Tensor:  # [T, H] in x's dtype
    if scales is None and w_gate.shape[0] <= DENSE_MAX_EXPERTS:
        return _dense_moe(x, weights, ids, w_gate, w_up, w_down)
    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    flat_ids = ids.reshape(-1)
    order = flat_ids.argsort(stable=True)  # token-expert pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=w_gate.shape[0]).tolist()
    token_of = order // k
    start = 0
    s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        tokens = token_of[start:start + n]
        start += n
        xe = x[tokens]
        h = F.silu(_expert_linear(xe, w_gate, s_gate, e)) * _expert_linear(xe, w_up, s_up, e)
        y = _expert_linear(h, w_down, s_down, e)
        # index_put_(accumulate) rather than index_add_: the latter costs milliseconds per call on CPU torch
        out.index_put_((tokens,), y.to(out.dtype) * weights.reshape(-1)[pairs, None].to(out.dtype), accumulate=True)
    return out.to(x.dtype)
