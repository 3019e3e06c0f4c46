"""Triton W8A8 block-scaled FP8 GEMM (docs/model.md §8), the blocked sum that `reference.fp8_block_linear` computes.

y[m, n] = sum_kb (x_q[m, kb] . w_q[n, kb]) * s_x[m, kb] * s_w[n // GROUP_N, kb], fp32 accumulation.
BLOCK_K equals the quantisation group along K, so each K step applies one scale per row of x and one per
column of w; M, N and K need not be multiples of the tiles (masked loads, zero fill). Programs are ordered
in GROUP_M-tall bands so neighbouring programs share tiles of w in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.kernels.fp8.reference import FP8_DTYPE


@triton.jit
def fp8_block_gemm_fwd_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,  # a: [M, K] fp8; b: [N, K] fp8; c: [M, N]; as: [M, Kb]; bs: [Nb, Kb]
    M, N, stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
    K: tl.constexpr,  # a few distinct values in a model; also the interpreter cannot loop to a runtime bound
    GROUP_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] = w^T tile
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + (offs_n // GROUP_N) * stride_bsn
    m_ok, n_ok = offs_m < M, offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + k0 // BLOCK_K, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + k0 // BLOCK_K, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch_config(M: int) -> dict[str, int]:
    """Tiles by batch size. Small M is weight-bandwidth bound: thin M tiles, more programs along N. Each compiles
    without spills for sm_90 (test_triton_compile.py); not yet tuned on the GPU (bench/kernel_bench.py times them)."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_block_gemm_fwd(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                       block: tuple[int, int] = (128, 128), out_dtype: torch.dtype = torch.bfloat16,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """xq fp8 [M, K], xs fp32 [M, ceil(K/bk)], w fp8 [N, K], ws fp32 [ceil(N/bn), ceil(K/bk)] -> [M, N]."""
    M, K = xq.shape
    N = w.shape[0]
    bn, bk = block
    assert xq.dtype == w.dtype == FP8_DTYPE, "xq and w: float8_e4m3fn"
    assert w.shape == (N, K) and xq.stride(1) == 1 and w.stride(1) == 1, "xq [M, K], w [N, K], K contiguous"
    assert xs.shape == (M, triton.cdiv(K, bk)) and xs.dtype == torch.float32, "xs: fp32 [M, ceil(K/bk)]"
    assert ws.shape == (triton.cdiv(N, bn), triton.cdiv(K, bk)) and ws.dtype == torch.float32, \
        "ws: fp32 [ceil(N/bn), ceil(K/bk)]"
    assert xs.stride(1) == 1 and ws.stride(1) == 1
    assert bk >= 16 and bk & (bk - 1) == 0, "block K: a power of two (it is the kernel's BLOCK_K)"
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device) if out is None else out
    assert y.shape == (M, N) and y.stride(1) == 1
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    cfg = launch_config(M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    fp8_block_gemm_fwd_kernel[grid](
        xq, w, y, xs, ws, M, N, xq.stride(0), w.stride(0), y.stride(0), xs.stride(0), ws.stride(0),
        K=K, GROUP_N=bn, BLOCK_K=bk, **cfg)
    return y
