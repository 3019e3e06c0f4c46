"""FP8 cases: activation quantisation, and the block-scaled linears (our quantise + GEMM) against the reference,
with the GEMM alone, a bf16 matmul and cuBLAS's FP8 GEMM forms on the same shape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from bench.bench_common import rel_err
from bench.kernel_suite.measure import Bench, Case, Row, measure, squeeze, tflops


def fp8_cases(b: Bench) -> Iterator[Case]:
    from qnext.kernels import fp8
    from qnext.kernels.fp8 import reference
    from qnext.kernels.fp8.triton_gemm import fp8_block_gemm_fwd
    H, dev = b.shapes.hidden, b.device
    for M in b.token_counts():
        x = torch.randn(M, H, dtype=torch.bfloat16, device=dev)
        nbytes = M * H * 2 + M * H + M * (H // 128) * 4
        yield "fp8_quant", f"[{M}, {H}]", lambda: measure(
            b, "fp8_quant", f"[{M}, {H}]", lambda: fp8.per_token_group_quant(x)[0],
            lambda: reference.per_token_group_quant(x)[0], nbytes, M)
    for name, N, K in b.shapes.fp8_linears:
        w, ws = reference.quantize_weight_block(torch.randn(N, K, device=dev) * 0.02)
        w_bf16 = reference.dequantize_weight_block(w, ws).to(torch.bfloat16)
        for M in b.token_counts():
            yield f"fp8_linear {name}", f"M={M} N={N} K={K}", lambda: fp8_linear_row(
                b, name, torch.randn(M, K, dtype=torch.bfloat16, device=dev), w, ws, w_bf16, fp8_block_gemm_fwd)


def fp8_linear_row(b: Bench, name: str, x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, w_bf16: torch.Tensor,
                   fp8_block_gemm_fwd: Callable[..., torch.Tensor]) -> Row:
    """Our quantise + block GEMM against the reference, with the GEMM alone, a bf16 matmul and cuBLAS's FP8
    GEMM forms on the same shape beside it."""
    from qnext.kernels import fp8
    from qnext.kernels.fp8 import reference
    M, K = x.shape
    N = w.shape[0]
    xq, xs = fp8.per_token_group_quant(x)
    r = measure(b, f"fp8_linear {name}", f"M={M} N={N} K={K}", lambda: fp8.fp8_block_linear(x, w, ws),
                lambda: reference.fp8_block_linear(x, w, ws), N * K + ws.numel() * 4 + M * K * 2 + M * N * 2, M)
    gemm = fp8_block_gemm_fwd(xq, xs, w, ws)
    r.timings["gemm_only"] = t_gemm = b.bench_us(lambda: fp8_block_gemm_fwd(xq, xs, w, ws))
    r.timings["bf16_matmul"] = t_bf16 = b.bench_us(lambda: x @ w_bf16.t())
    flops = 2 * M * N * K
    notes = [f"{tflops(flops, r.triton_us):.0f} TFLOP/s", f"gemm alone {t_gemm:.1f} us "
             f"({tflops(flops, t_gemm):.0f} TFLOP/s)", f"bf16 matmul {t_bf16:.1f} us"]
    notes += cublas_fp8(b, x, xq, xs, w, ws, w_bf16, gemm, r.timings)
    r.extra = "; ".join(notes)
    return r


def cublas_fp8(b: Bench, x: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
               w_bf16: torch.Tensor, ours: torch.Tensor, timings: dict[str, float | None]) -> list[str]:
    """cuBLAS FP8 speed references: torch._scaled_mm per-tensor (x and W one scale each) and row-wise (per
    token x per output channel), which scale more coarsely than our 1x128 / 128x128 blocks, so only their speed
    compares (their error vs the bf16 product of the dequantised W is shown); and block-wise (1x128 activation
    scales, 128x128 weight scales: our exact operands, so its output is compared with our GEMM's), through
    torch._scaled_mm or else torch.nn.functional.scaled_mm, where this torch and GPU have it. A form that
    refuses M is retried with M padded to 16. Returns one note per form: its time, or why it did not run."""
    notes = []
    want = x @ w_bf16.t()
    for name, make, against in (("per-tensor", _scaled_mm_tensorwise, want), ("row-wise", _scaled_mm_rowwise, want),
                                ("block-wise", _scaled_mm_blockwise, ours), ("block-wise F.scaled_mm",
                                                                             _scaled_mm_v2_blockwise, ours)):
        if name == "block-wise F.scaled_mm" and timings.get("scaled_mm block-wise") is not None:
            continue  # torch._scaled_mm took the block scales already
        key = f"scaled_mm {name}"
        timings[key] = None
        err_text = ""
        for pad in (1, 16):
            try:
                fn = make(_pad_rows(x, pad), _pad_rows(xq, pad), _pad_rows(xs, pad, 1.0), w, ws, w_bf16)
                out = fn()[:x.shape[0]]
                err = rel_err(out, against)
                timings[key] = t = b.bench_us(fn)
                vs = "vs ours" if against is ours else "vs bf16"
                padded = ", M padded to 16" if pad > 1 else ""
                notes.append(f"cuBLAS fp8 {name} {t:.1f} us (err {vs} {err:.1e}{padded})")
                break
            except Exception as e:  # an unsupported form on this torch / device: say why, go on
                err_text = err_text or squeeze(str(e)) or type(e).__name__  # the unpadded attempt's reason
        else:
            notes.append(f"cuBLAS fp8 {name}: {err_text}")
    return notes


def _pad_rows(t: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Rows appended up to a multiple; fp8 through its bytes (zero bytes are +0.0), as not every op takes fp8."""
    pad = -t.shape[0] % multiple
    if not pad:
        return t
    if t.element_size() == 1:
        raw = t.view(torch.uint8)
        return torch.cat([raw, raw.new_zeros((pad, *t.shape[1:]))]).view(t.dtype)
    return torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])


def _quant_rows(t: torch.Tensor, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 and fp32 dequant scale: one for the tensor ([] shaped) or one per row ([rows, 1])."""
    a = t.float().abs()
    s = (a.amax() if per_tensor else a.amax(-1, keepdim=True)).clamp(min=1e-12) / 448.0
    return (t.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s.float()


def _scaled_mm_tensorwise(xp, xqp, xsp, w, ws, w_bf16) -> Callable[[], torch.Tensor]:
    (a, sa), (bq, sb) = _quant_rows(xp, True), _quant_rows(w_bf16, True)
    bt = bq.t()  # [K, N] column-major, as cuBLAS wants the second operand
    return lambda: torch._scaled_mm(a, bt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def _scaled_mm_rowwise(xp, xqp, xsp, w, ws, w_bf16) -> Callable[[], torch.Tensor]:
    (a, sa), (bq, sb) = _quant_rows(xp, False), _quant_rows(w_bf16, False)
    bt, sbt = bq.t(), sb.t().contiguous()  # scale_b [1, N]
    return lambda: torch._scaled_mm(a, bt, scale_a=sa, scale_b=sbt, out_dtype=torch.bfloat16)


def _scaled_mm_blockwise(xp, xqp, xsp, w, ws, w_bf16) -> Callable[[], torch.Tensor]:
    """scale_a [M, K/128] outer-dim-major (stride (1, M)); scale_b [K/128, N/128] = the weight scales
    transposed (stride (1, K/128)), as PyTorch's own block-wise tests lay them out."""
    sa, sb, bt = xsp.t().contiguous().t(), ws.t(), w.t()
    return lambda: torch._scaled_mm(xqp, bt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def _scaled_mm_v2_blockwise(xp, xqp, xsp, w, ws, w_bf16) -> Callable[[], torch.Tensor]:
    import torch.nn.functional as F
    from torch.nn.functional import ScalingType
    sa, sb, bt = xsp.t().contiguous().t(), ws.t(), w.t()
    return lambda: F.scaled_mm(xqp, bt, [sa], [ScalingType.BlockWise1x128], [sb], [ScalingType.BlockWise128x128],
                               output_dtype=torch.bfloat16)
