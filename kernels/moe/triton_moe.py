"""Triton routed experts of a sparse MoE block (docs/model.md §6), the semantics of `reference.fused_moe`:

    y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = ids[t, j]

Design. `align.py` groups the T*k token-expert pairs by expert into BLOCK_M-aligned blocks (`triton_align.py`
in one launch for decode-sized batches). One grouped-GEMM kernel then runs twice over those blocks, a program
multiplying one block of pairs by one expert's weights:
  1. gate+up: rows x[pair // k] against w_gate[e] and w_up[e] (two accumulators over the same K loop),
     h[pair] = silu(gate) * up on the way out                                           -> h [T*k, I]
  2. down: rows h[pair] against w_down[e], scaled by the pair's routing weight          -> y [T*k, H]
and the k rows of each token are summed (one torch reduction, in fp32). Writing y per pair and reducing keeps the
combine deterministic (no atomics) at the cost of T*k*H extra bytes, which at decode are negligible next to the
experts' weights.

FP8 (block-128 weights with weight_scale_inv [E, ceil(rows/128), ceil(cols/128)]) is W8A8 like `Fp8Linear`: x and
h are quantised per token per 128-group by kernels/fp8's kernel, BLOCK_K = 128 so each K step applies one
activation scale per row and one weight scale per column.

The router is `triton_router.py` (its logits GEMM stays a cuBLAS linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.kernels.fp8.reference import FP8_DTYPE
from qnext.kernels.fp8.triton_quant import per_token_group_quant_fwd
from qnext.kernels.moe.align import align_pairs_by_expert
from qnext.kernels.moe.triton_align import DECODE_MAX_PAIRS, align_pairs_by_expert_fwd
from qnext.kernels.triton_common import dot, interpreting


@triton.jit
def moe_gemm_kernel(
    a_ptr, as_ptr, b_ptr, b2_ptr, bs_ptr, b2s_ptr, c_ptr,  # a: [rows, K]; b, b2: [E, N, K]; c: [num_pairs, N]
    pairs_ptr, block_expert_ptr, num_padded_ptr, route_w_ptr,  # sorted pairs [P]; [P / BLOCK_M]; [1]; [num_pairs]
    N, num_pairs, stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
    K: tl.constexpr,  # a model has two (hidden, moe_intermediate); also the interpreter's loops need it
    ROW_DIV: tl.constexpr,  # row of a = pair // ROW_DIV: top_k when a is x, 1 when a is h
    GATED: tl.constexpr,  # c = silu(a b^T) * (a b2^T)
    MUL_ROUTE_W: tl.constexpr, IS_FP8: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):  # the grid is sized for the worst routing
        return
    pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_ok = pairs < num_pairs  # padding entries hold num_pairs
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = (pairs // ROW_DIV).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_off = e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] = w^T
    bs_off = e * stride_bse + (offs_n // GROUP_N) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_off + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IS_FP8:
            a_s = tl.load(as_ptr + rows * stride_asm + k0 // BLOCK_K, mask=m_ok, other=0.0)[:, None]
            b_s = tl.load(bs_ptr + bs_off + k0 // BLOCK_K, mask=n_ok, other=0.0)[None, :]
            acc += dot(a, b, PRECISION, INTERPRET) * a_s * b_s
        else:
            acc += dot(a.to(b.dtype), b, PRECISION, INTERPRET)
        if GATED:
            b2 = tl.load(b2_ptr + b_off + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IS_FP8:
                b2_s = tl.load(b2s_ptr + bs_off + k0 // BLOCK_K, mask=n_ok, other=0.0)[None, :]
                acc2 += dot(a, b2, PRECISION, INTERPRET) * a_s * b2_s
            else:
                acc2 += dot(a.to(b2.dtype), b2, PRECISION, INTERPRET)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc2
    if MUL_ROUTE_W:
        acc *= tl.load(route_w_ptr + pairs, mask=m_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch_config(num_pairs: int, num_experts: int, is_fp8: bool) -> dict[str, int]:
    """A few pairs per expert (decode, and 512-expert batches up to a few hundred tokens) are weight-bandwidth
    bound: 16-row blocks waste little on padding. More pairs per expert take 64-row blocks. BLOCK_K is the FP8
    group (128). Checked for spills on sm_90 (test_triton_compile.py); not yet tuned on a GPU."""
    if num_pairs <= 8 * num_experts:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128 if is_fp8 else 64, num_warps=8, num_stages=3)


def moe_gemm_fwd(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
                 sorted_pairs: torch.Tensor, block_expert: torch.Tensor, num_padded: torch.Tensor,
                 num_pairs: int, row_div: int, cfg: dict[str, int], out_dtype: torch.dtype,
                 w2: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                 route_w: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """c [num_pairs, N]: row p = a[p // row_div] @ w[e_p]^T (gated: silu(a w^T) * (a w2^T)), times route_w[p]
    when given. a [rows, K] (fp8 with a_scale [rows, ceil(K/128)] or float), w/w2 [E, N, K]."""
    E, N, K = w.shape
    is_fp8 = w.dtype == FP8_DTYPE
    assert a.shape[1] == K and a.stride(1) == 1 and w.stride(2) == 1
    assert (a.dtype == FP8_DTYPE) == is_fp8, "FP8 weights take FP8 activations"
    if w2 is not None:
        assert w2.shape == w.shape and w2.stride() == w.stride() and w2.dtype == w.dtype
    if is_fp8:
        assert cfg["BLOCK_K"] == 128 and a_scale is not None and w_scale is not None
        assert a_scale.shape == (a.shape[0], triton.cdiv(K, 128)) and a_scale.stride(1) == 1
        assert w_scale.shape == (E, triton.cdiv(N, 128), triton.cdiv(K, 128)) and w_scale.stride(2) == 1
        assert w2 is None or (w2_scale is not None and w2_scale.stride() == w_scale.stride())
    c = torch.empty(num_pairs, N, dtype=out_dtype, device=a.device) if out is None else out
    assert c.shape == (num_pairs, N) and c.stride(1) == 1
    w2 = w if w2 is None else w2  # unused pointers when not gated / not FP8
    a_scale = a if a_scale is None else a_scale
    w_scale = w if w_scale is None else w_scale
    w2_scale = w_scale if w2_scale is None else w2_scale
    route_w = c if route_w is None else route_w
    grid = (sorted_pairs.numel() // cfg["BLOCK_M"], triton.cdiv(N, cfg["BLOCK_N"]))
    moe_gemm_kernel[grid](
        a, a_scale, w, w2, w_scale, w2_scale, c, sorted_pairs, block_expert, num_padded, route_w,
        N, num_pairs, a.stride(0), a_scale.stride(0) if is_fp8 else 0, w.stride(0), w.stride(1),
        w_scale.stride(0) if is_fp8 else 0, w_scale.stride(1) if is_fp8 else 0, c.stride(0),
        K=K, ROW_DIV=row_div, GATED=w2 is not w, MUL_ROUTE_W=route_w is not c, IS_FP8=is_fp8, GROUP_N=128,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", INTERPRET=interpreting(), **cfg)
    return c


def fused_moe_fwd(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] routing weights
    ids: torch.Tensor,  # [T, k] expert ids
    w_gate: torch.Tensor,  # [E, I, H]
    w_up: torch.Tensor,  # [E, I, H]
    w_down: torch.Tensor,  # [E, H, I]
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # FP8 block scales of the three
) -> torch.Tensor:
    """[T, H] in x's dtype: each token's routed experts, weighted and summed."""
    T, H = x.shape
    E, I, _ = w_gate.shape
    k = ids.shape[1]
    assert x.stride(1) == 1 and w_gate.shape == w_up.shape == (E, I, H) and w_down.shape == (E, H, I)
    assert weights.shape == ids.shape and ids.shape[0] == T
    is_fp8 = scales is not None
    assert (w_gate.dtype == FP8_DTYPE) == is_fp8, "FP8 expert weights come with their block scales"
    if T == 0:
        return torch.empty_like(x)
    num_pairs = T * k
    cfg = launch_config(num_pairs, E, is_fp8)
    align = align_pairs_by_expert_fwd if num_pairs <= DECODE_MAX_PAIRS else align_pairs_by_expert
    sorted_pairs, block_expert, num_padded = align(ids, E, cfg["BLOCK_M"])
    route_w = weights.reshape(-1).float().contiguous()
    ct = torch.promote_types(x.dtype, torch.float32)
    s_gate, s_up, s_down = scales if is_fp8 else (None, None, None)
    a, a_s = per_token_group_quant_fwd(x) if is_fp8 else (x, None)
    h = moe_gemm_fwd(a, a_s, w_gate, s_gate, sorted_pairs, block_expert, num_padded, num_pairs, k, cfg, x.dtype,
                     w2=w_up, w2_scale=s_up)  # [T*k, I]
    a, a_s = per_token_group_quant_fwd(h) if is_fp8 else (h, None)
    y = moe_gemm_fwd(a, a_s, w_down, s_down, sorted_pairs, block_expert, num_padded, num_pairs, 1, cfg, x.dtype,
                     route_w=route_w)  # [T*k, H], weighted
    return y.view(T, k, H).sum(1, dtype=ct).to(x.dtype)
