"""Triton RMSNorms of Qwen3-Next (docs/model.md §3), matching `kernels/norms/reference.py`.

Each program normalises BLOCK_ROWS rows of a [rows, D] view held whole in registers (D up to a few
thousand: hidden 2048, head 256, value head 128), so small D still gives each program a few thousand elements.
Math in fp32; intermediate roundings that the reference does in the input dtype are repeated here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr,  # x, residual, y, h: [rows, D]; w: [D]
    n_rows, D, stride_x, stride_r, stride_y, stride_h, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)  # the residual stream keeps the input dtype, as `x + r` does
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # [BLOCK_ROWS]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * (1.0 + w)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_rms_norm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr,  # x, z, y: [rows, D]; w: [D]
    n_rows, D, stride_x, stride_z, stride_y, eps,
    ROUND_PRODUCT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    # HF rounds the normed x to the input dtype before the weight, and the product too when w is 16-bit.
    y = w[None, :] * (x32 * rstd[:, None]).to(x.dtype).to(tl.float32)
    if ROUND_PRODUCT:
        y = y.to(x.dtype).to(tl.float32)
    y = y * (z * tl.sigmoid(z))
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def launch_config(n_rows: int, D: int) -> dict[str, int]:
    """Whole rows, about 4K elements a program (compiles without spills for sm_90: test_triton_compile.py)."""
    block_d = triton.next_power_of_2(D)
    block_rows = max(1, min(4096 // block_d, triton.next_power_of_2(n_rows)))
    return dict(BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=min(8, max(1, block_rows * block_d // 512)))


def _check_rows(name: str, t: torch.Tensor, rows: int, D: int) -> None:
    assert t.dim() == 2 and tuple(t.shape) == (rows, D), f"{name}: expected [{rows}, {D}], got {list(t.shape)}"
    assert t.stride(1) == 1, f"{name}: the last dim must be contiguous"


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [rows, D] -> (y [rows, D] = h / rms(h) * (1 + w), h = x + residual or None)."""
    rows, D = x.shape
    _check_rows("x", x, rows, D)
    assert weight.shape == (D,) and weight.is_contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _check_rows("out", y, rows, D)
    h = None
    if residual is not None:
        _check_rows("residual", residual, rows, D)
        h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual_out is None else residual_out
        _check_rows("residual_out", h, rows, D)
    if rows == 0:
        return y, h
    cfg = launch_config(rows, D)
    rms_norm_fwd_kernel[(triton.cdiv(rows, cfg["BLOCK_ROWS"]),)](
        x, residual if residual is not None else x, weight, y, h if h is not None else y,
        rows, D, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        h.stride(0) if h is not None else 0, eps, HAS_RESIDUAL=residual is not None, **cfg)
    return y, h


def gated_rms_norm_fwd(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """x, z: [rows, D] -> y [rows, D] = w * (x / rms(x)) * silu(z), in x's dtype."""
    rows, D = x.shape
    _check_rows("x", x, rows, D)
    _check_rows("z", z, rows, D)
    assert weight.shape == (D,) and weight.is_contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _check_rows("out", y, rows, D)
    if rows == 0:
        return y
    cfg = launch_config(rows, D)
    gated_rms_norm_fwd_kernel[(triton.cdiv(rows, cfg["BLOCK_ROWS"]),)](
        x, z, weight, y, rows, D, x.stride(0), z.stride(0), y.stride(0), eps,
        ROUND_PRODUCT=torch.promote_types(weight.dtype, x.dtype) == x.dtype, **cfg)
    return y
