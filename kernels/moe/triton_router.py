"""Triton router tail (docs/model.md §6), the semantics of `reference.route` after its logits GEMM: softmax over the
experts in fp32, top-k, optional renormalisation, in one launch instead of torch's four (softmax, topk, sum, div).

Why a kernel: at batch-1 decode the routed experts stream ~31 MB of FP8 weights per layer, ~7 us on an H200, so
a few microsecond-scale launches per layer are a real share of the MoE. The logits GEMM stays a cuBLAS linear.

One program per token: the row of E probabilities sits in registers and top-k is k rounds of argmax (lowest
index on ties), each masking its winner. k is 10 for Qwen3-Next, so k passes over 512 values cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def topk_softmax_kernel(
    logits_ptr, weights_ptr, ids_ptr,  # logits: [T, E]; weights: [T, K] fp32; ids: [T, K] int64
    E, stride_l, stride_w, stride_i,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    j = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_K,), dtype=tl.int32)
    live = tl.where(e < E, p, -1.0)  # probabilities >= 0: -1 marks padding and taken experts
    for r in tl.static_range(K):
        w = tl.max(live, 0)
        i = tl.min(tl.where(live == w, e, BLOCK_E), 0)  # the lowest index holding the max
        top_w = tl.where(j == r, w, top_w)
        top_i = tl.where(j == r, i, top_i)
        live = tl.where(e == i, -1.0, live)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 0)
    tl.store(weights_ptr + t * stride_w + j, top_w, mask=j < K)
    tl.store(ids_ptr + t * stride_i + j, top_i.to(tl.int64), mask=j < K)


def topk_softmax_fwd(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights fp32 [T, k], expert ids int64 [T, k]), in descending weight order."""
    T, E = logits.shape
    assert logits.stride(1) == 1 and 1 <= top_k <= E
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, ids
    block_e = triton.next_power_of_2(E)
    topk_softmax_kernel[(T,)](logits, weights, ids, E, logits.stride(0), weights.stride(0), ids.stride(0),
                              K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=block_e,
                              RENORMALIZE=renormalize, num_warps=min(8, max(1, block_e // 128)))
    return weights, ids
