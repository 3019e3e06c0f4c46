"""Triton per-token-group FP8 quantisation (docs/model.md §8), matching `reference.per_token_group_quant` bit for bit.

x [M, K] -> q fp8 e4m3 [M, K], s fp32 [M, ceil(K/group)] with s = max(amax(|x_group|), eps) / 448 and
q = round(clamp(x / s, -448, 448)). A program quantises BLOCK_G groups of one row; the last group is masked
when K is not a multiple of the group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.kernels.fp8.reference import FP8_DTYPE, FP8_MAX


@triton.jit
def round_to_e4m3(v):
    """Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, still in fp32.

    The cast that follows is then exact. On the GPU the cast alone rounds the same way; the Triton
    interpreter's cast does not (it drops the carry into the exponent: 127.8 -> 64), and the tests run there.
    """
    a = tl.abs(v)
    e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, -6)  # exponent, floored at e4m3's subnormals
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: spacing 2^(e-3)
    inv_ulp = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = ((a * inv_ulp + 8388608.0) - 8388608.0) * ulp  # a / ulp < 16: adding 2^23 rounds it to an integer
    sign = (v.to(tl.int32, bitcast=True) >> 31) << 31
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def per_token_group_quant_fwd_kernel(
    x_ptr, q_ptr, s_ptr,  # x, q: [M, K]; s: [M, G]
    K, G, stride_x, stride_q, stride_s, eps, fp8_max,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BLOCK_G, GROUP]
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), eps), fp8_max)  # [BLOCK_G]
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None]), -fp8_max), fp8_max)
    tl.store(q_ptr + row * stride_q + cols, round_to_e4m3(v).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_s + groups, s, mask=groups < G)


def launch_config(G: int, group: int) -> dict[str, int]:
    """Up to 4K elements (BLOCK_G groups of one row) a program."""
    block_g = min(triton.next_power_of_2(G), max(1, 4096 // group))
    return dict(BLOCK_G=block_g, num_warps=min(8, max(1, block_g * group // 256)))


def per_token_group_quant_fwd(x: torch.Tensor, group: int = 128, eps: float = 1e-10,
                              out: tuple[torch.Tensor, torch.Tensor] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (q fp8 e4m3 [M, K], s fp32 [M, ceil(K/group)])."""
    assert x.dim() == 2 and x.stride(1) == 1, "x: [M, K] with a contiguous last dim"
    assert group >= 16 and group & (group - 1) == 0, "group: a power of two"
    M, K = x.shape
    G = triton.cdiv(K, group)
    q, s = out if out is not None else (torch.empty(M, K, dtype=FP8_DTYPE, device=x.device),
                                        torch.empty(M, G, dtype=torch.float32, device=x.device))
    assert q.shape == (M, K) and q.dtype == FP8_DTYPE and q.stride(1) == 1
    assert s.shape == (M, G) and s.dtype == torch.float32 and s.stride(1) == 1
    if M == 0 or K == 0:
        return q, s
    cfg = launch_config(G, group)
    per_token_group_quant_fwd_kernel[(M, triton.cdiv(G, cfg["BLOCK_G"]))](
        x, q, s, K, G, x.stride(0), q.stride(0), s.stride(0), eps, FP8_MAX, GROUP=group, **cfg)
    return q, s
