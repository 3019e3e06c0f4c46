"""Triton kernels vs their torch references at Qwen3-Next-80B-A3B's shapes, on a CUDA device.

For each case: median time (`triton.testing.do_bench`) of the Triton path and of the torch reference, the bytes
the op must move at least (read inputs and weights once, write outputs once), the bandwidth that implies, and
the fraction of the memory-bandwidth bound reached (bound = bytes / the device's copy bandwidth, measured here
with a large device-to-device copy unless --peak-gbps is given). GEMMs also show TFLOP/s, the time of a plain
bf16 matmul of the same shape and of cuBLAS's FP8 GEMM (`torch._scaled_mm`, per-tensor, row-wise and, where
this torch has it, block-wise scaled). The rel_err column compares the Triton output with the reference's.
The gated delta rule is also compared, in the same run, with flash-linear-attention (`fla`, when importable)
and, at 8K tokens, with published per-layer figures.

    python bench/kernel_bench.py --out kernels.json            # every op; about a minute or two on one GPU
    python bench/kernel_bench.py --ops fp8 --batch-sizes 1,256
    python bench/kernel_bench.py --quick --time-budget-s 60     # the key figures first, then stop
    python bench/kernel_bench.py --device cpu --small           # plumbing check: Triton interpreter, tiny shapes

Built to run once, unattended, under a hard timeout on a GPU where nothing has run before: each case runs on
its own (a failure is recorded with its traceback and the run goes on; exit status 1 at the end), every row is
printed as it is measured and --out is rewritten after each, so a run killed part-way leaves all it measured
and names the case it was in. The references are slow at long sequences: above --max-reference-tokens they
are not timed, above --max-check-tokens not run at all (missing values print as "-").

Shapes (docs/model.md §1, §4-§9): hidden 2048; FP8 linears in_proj_qkvz [12288, 2048], q_proj [8192, 2048],
out_proj/o_proj [2048, 4096], shared-expert up [512, 2048] and down [2048, 512]; norms over hidden 2048
(optionally with the residual add), q/k norm (16 heads x 256) and the gated norm (32 value heads x 128); conv
over conv_dim 8192, kernel 4; gated delta rule with 16 key / 32 value heads of 128, fp32 states; paged attention
with 16 query / 2 KV heads of 256 over 16-token blocks; the router and routed MoE with 512 experts, top-10,
moe_intermediate 512 (bf16 and FP8 weights). Decode batches of 1/64/256 tokens (conv, gated delta rule,
attention: that many sequences of one token; attention over a 4096-token context, and batch 1 over 32768),
speculative-verify batches of 3-token chunks (gated delta rule, up to 64 sequences), a 4096-token prefill
(also the GEMMs', norms' and MoE's large batch), 8192 for the gated delta rule (the published comparison) and
32768 for the gated delta rule and attention.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16; the bound for the compute-bound rows (prefill, big MoE)
# Gated delta rule chunked prefill, one sequence of 8192 tokens, one Qwen3-Next layer (16 key / 32 value heads
# of 128), H200: the figures published for FLA's Triton kernels and for FlashQLA.
PUBLISHED_GDR_8K = "published H200, T=8192, per layer: FLA 472 us, FlashQLA 280 us"
DEFAULT_OPS = "gdr,fp8,attention,moe,fla,conv,norms"  # most wanted first: a run cut short keeps those


@dataclass(frozen=True)
class Shapes:
    """Every dimension the cases use: the model's, or --small's (every one shrunk, so that the Triton
    interpreter runs all cases on a CPU in seconds; FP8 dims stay multiples of the 128 block)."""
    hidden: int = 2048
    conv_dim: int = 8192
    conv_k: int = 4
    heads_q: int = 16
    heads_kv: int = 2
    head_dim: int = 256
    kv_block: int = 16
    experts: int = 512
    top_k: int = 10
    moe_intermediate: int = 512
    decode_context: int = 4096  # context of every sequence in the attention decode rows
    fp8_linears: tuple[tuple[str, int, int], ...] = (
        ("in_proj_qkvz", 12288, 2048), ("q_proj", 8192, 2048), ("out_proj", 2048, 4096),
        ("shared_up", 512, 2048), ("shared_down", 2048, 512))
    prefill: int = 4096
    prefill_mid: int = 8192  # the gated delta rule's published comparison
    prefill_long: int = 32768
    gdr_hk: int = 16  # key heads
    gdr_hv: int = 32  # value heads
    gdr_d: int = 128  # dk = dv
    batch_sizes: str = "1,64,256"


MODEL = Shapes()
SMALL = Shapes(hidden=256, conv_dim=64, heads_q=4, heads_kv=2, head_dim=32, experts=8, top_k=2,
               moe_intermediate=128, decode_context=40,
               fp8_linears=(("in_proj_qkvz", 384, 256), ("out_proj", 256, 128)),
               prefill=70, prefill_mid=100, prefill_long=130, gdr_hk=2, gdr_hv=4, gdr_d=32, batch_sizes="1,3")


@dataclass
class Row:
    op: str
    shape: str
    triton_us: float | None
    reference_us: float | None  # None: not timed (above --max-reference-tokens, or no reference)
    min_bytes: int
    gbps: float | None
    bound_pct: float | None  # bandwidth-bound time / Triton time
    rel_err: float | None  # None: no reference run (above --max-check-tokens)
    extra: str = ""
    timings: dict[str, float | None] = field(default_factory=dict)  # other implementations' us, by name


class Skip(Exception):
    """A case that cannot run here (a missing package, a CUDA-only comparison on CPU): recorded as skipped,
    not as an error."""


class Interrupted(BaseException):
    """SIGTERM (the run's timeout): not an Exception, so that no per-case handler swallows it."""


@dataclass
class Bench:
    """The run's settings, handed to every case builder."""
    device: str
    shapes: Shapes
    batch_sizes: list[int]
    peak_gbps: float
    warmup_ms: float
    rep_ms: float
    max_reference_tokens: int
    max_check_tokens: int
    long: bool  # include the 32K-token cases
    prefill_batches: bool  # the token-count ops (GEMMs, norms, MoE) also at the prefill size

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def bench_us(self, fn: Callable[[], object]) -> float:
        """Median of do_bench on CUDA; on CPU (the interpreter, seconds a call) one timed call after the one
        the caller made, which is all a plumbing check needs."""
        if self.cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median") * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def token_counts(self) -> list[int]:
        """Batch sizes of the ops that only see a token count: the decode batches, then the prefill."""
        extra = [self.shapes.prefill] if self.prefill_batches and self.shapes.prefill not in self.batch_sizes else []
        return self.batch_sizes + extra


Case = tuple[str, str, Callable[[], Row]]  # (op, shape, measure): builders yield them lazily, one at a time


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def copy_gbps(b: Bench) -> float:
    """Device copy bandwidth: read + write of a 2 GiB buffer (64 MiB on CPU, where it only feeds the columns)."""
    src = torch.empty((2 << 30) if b.cuda else (64 << 20), dtype=torch.uint8, device=b.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / (b.bench_us(lambda: dst.copy_(src)) * 1e-6) / 1e9


def measure(b: Bench, op: str, shape: str, fast: Callable[[], torch.Tensor],
            ref: Callable[[], torch.Tensor] | None, nbytes: int, tokens: int, extra: str = "",
            cheap_ref: bool = False) -> Row:
    """One row: rel_err from one call of each (the reference only up to --max-check-tokens), then the timings
    (the reference's only up to --max-reference-tokens). `cheap_ref`: a fast stand-in reference (SDPA), run
    and timed at any size."""
    out = fast()
    err = rel_err(out, ref()) if ref is not None and (cheap_ref or tokens <= b.max_check_tokens) else None
    del out
    t_fast = b.bench_us(fast)
    t_ref = b.bench_us(ref) if ref is not None and (cheap_ref or tokens <= b.max_reference_tokens) else None
    gbps = nbytes / (t_fast * 1e-6) / 1e9
    return Row(op, shape, t_fast, t_ref, nbytes, gbps, 100 * gbps / b.peak_gbps, err, extra)


def tflops(flops: float, us: float | None) -> float:
    return flops / (us * 1e-6) / 1e12 if us else float("nan")


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


def squeeze(text: str, head: int = 60, tail: int = 140) -> str:
    """One line; a long message keeps its start and its end (PyTorch's scaled_mm errors list every form it
    knows, then say what they got last)."""
    text = " ".join(text.split())
    return text if len(text) <= head + tail + 5 else text[:head] + " ... " + text[-tail:]


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


def norm_cases(b: Bench) -> Iterator[Case]:
    from qnext.kernels import norms
    from qnext.kernels.norms import reference
    s, dev, bf16 = b.shapes, b.device, torch.bfloat16
    H = s.hidden
    w = torch.randn(H, device=dev, dtype=bf16) * 0.1
    wh = torch.randn(s.head_dim, device=dev, dtype=bf16) * 0.1
    wg = torch.ones(s.gdr_d, device=dev, dtype=bf16)
    for T in b.token_counts():
        x = torch.randn(T, H, device=dev, dtype=bf16)
        r = torch.randn_like(x)
        yield "rms_norm", f"[{T}, {H}]", lambda: measure(
            b, "rms_norm", f"[{T}, {H}]", lambda: norms.rms_norm_zero_centred(x, w, 1e-6),
            lambda: reference.rms_norm_zero_centred(x, w, 1e-6), 2 * x.numel() * 2, T)
        yield "add_rms_norm", f"[{T}, {H}]", lambda: measure(
            b, "add_rms_norm", f"[{T}, {H}]", lambda: norms.add_rms_norm_zero_centred(x, r, w, 1e-6)[0],
            lambda: reference.rms_norm_zero_centred(x + r, w, 1e-6), 4 * x.numel() * 2, T)
        q = torch.randn(T, s.heads_q, s.head_dim, device=dev, dtype=bf16)
        qs = f"[{T}, {s.heads_q}, {s.head_dim}]"
        yield "q_norm", qs, lambda: measure(
            b, "q_norm", qs, lambda: norms.rms_norm_zero_centred(q, wh, 1e-6),
            lambda: reference.rms_norm_zero_centred(q, wh, 1e-6), 2 * q.numel() * 2, T)
        o, z = (torch.randn(T, s.gdr_hv, s.gdr_d, device=dev, dtype=bf16) for _ in range(2))
        os_ = f"[{T}, {s.gdr_hv}, {s.gdr_d}]"
        yield "gated_rms_norm", os_, lambda: measure(
            b, "gated_rms_norm", os_, lambda: norms.gated_rms_norm(o, z, wg, 1e-6),
            lambda: reference.gated_rms_norm(o, z, wg, 1e-6), 3 * o.numel() * 2, T)


def conv_cases(b: Bench) -> Iterator[Case]:
    from qnext.kernels import conv1d
    from qnext.kernels.conv1d import reference
    s, dev, bf16 = b.shapes, b.device, torch.bfloat16
    D, Kc = s.conv_dim, s.conv_k
    w = torch.randn(D, Kc, device=dev, dtype=bf16) * 0.5
    cases = [(f"decode B={B}", [1] * B, [True] * B) for B in b.batch_sizes if B <= 1024]
    cases.append((f"prefill T={s.prefill}", [s.prefill], [False]))
    for label, lens, init in cases:
        B, T = len(lens), sum(lens)
        x = torch.randn(T, D, device=dev, dtype=bf16)
        pool = torch.randn(B + 8, D, Kc - 1, device=dev, dtype=bf16)
        pool_ref = pool.clone()
        slots = torch.arange(B, device=dev) + 4
        nbytes = 2 * T * D * 2 + 2 * B * D * (Kc - 1) * 2 + D * Kc * 2
        yield "causal_conv1d", label, lambda: measure(
            b, "causal_conv1d", label, lambda: conv1d.causal_conv1d_varlen(x, w, pool, slots, lens, init),
            lambda: reference.causal_conv1d_varlen(x, w, pool_ref, slots, lens, init), nbytes, T,
            extra="includes the host->device metadata copy")


def paged_kv(s: Shapes, lens: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V pools holding `lens` tokens per sequence in shuffled blocks, and the block tables [B, max_blocks]."""
    need = [-(-n // s.kv_block) for n in lens]
    perm = torch.randperm(sum(need), device=device).to(torch.int32)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device=device)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[start:start + n]
        start += n
    shape = (sum(need), s.kv_block, s.heads_kv, s.head_dim)
    return (torch.randn(shape, device=device, dtype=torch.bfloat16),
            torch.randn(shape, device=device, dtype=torch.bfloat16), tables)


def attention_cases(b: Bench) -> Iterator[Case]:
    """Decodes (batch B, each over decode_context tokens) and one-sequence prefills of 4K and 32K tokens: this
    step's k/v written into the pool, then attention over it. Above the 4K prefill the paged reference would
    materialise the whole score matrix (64 GB at 32K), so torch's SDPA (flash, causal, GQA) over contiguous K/V
    stands in as the reference, run and timed at any size."""
    s = b.shapes
    cases = [(f"decode B={B} ctx={s.decode_context}", [1] * B, [s.decode_context] * B)
             for B in b.batch_sizes if B <= 1024]
    if b.long:
        cases.append((f"decode B=1 ctx={s.prefill_long}", [1], [s.prefill_long]))  # split-KV territory
    cases += [(f"prefill T={n}", [n], [n]) for n in (s.prefill, s.prefill_long) if b.long or n == s.prefill]
    for label, qlens, ctx in cases:
        yield "paged_attention", label, lambda: attention_row(b, label, qlens, ctx)


def attention_row(b: Bench, label: str, qlens: list[int], ctx: list[int]) -> Row:
    import torch.nn.functional as F

    from qnext.kernels import attention
    from qnext.kernels.attention import reference
    s, dev, bf16 = b.shapes, b.device, torch.bfloat16
    scale = s.head_dim ** -0.5
    T = sum(qlens)
    k_cache, v_cache, tables = paged_kv(s, ctx, dev)
    q = torch.randn(T, s.heads_q, s.head_dim, device=dev, dtype=bf16)
    k, v = (torch.randn(T, s.heads_kv, s.head_dim, device=dev, dtype=bf16) for _ in range(2))
    pos = torch.tensor([c - n + j for n, c in zip(qlens, ctx) for j in range(n)], device=dev)
    seq = torch.repeat_interleave(torch.arange(len(qlens), device=dev), torch.tensor(qlens, device=dev))
    slots = (tables[seq, pos // s.kv_block].long() * s.kv_block + pos % s.kv_block)

    def fast():
        return attention.paged_attention_varlen(q, k, v, k_cache, v_cache, slots, tables, qlens, ctx, scale)

    sdpa = T > s.prefill
    if not sdpa:
        def ref():
            return reference.paged_attention_varlen(q, k, v, k_cache, v_cache, slots, tables, qlens, ctx, scale)
    else:
        def ref():
            kc = k_cache[tables[0].long()].flatten(0, 1)[:T].transpose(0, 1)[None]  # [1, Hkv, T, D]
            vc = v_cache[tables[0].long()].flatten(0, 1)[:T].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc, vc, is_causal=True, scale=scale,
                                               enable_gqa=True)
            return o[0].transpose(0, 1)
    kv_read = sum(ctx) * s.heads_kv * s.head_dim * 2 * 2
    nbytes = kv_read + 2 * q.numel() * 2 + 2 * k.numel() * 2
    flops = sum(4 * s.heads_q * s.head_dim * n * (c - n + (n + 1) / 2) for n, c in zip(qlens, ctx))
    r = measure(b, "paged_attention", label, fast, ref, nbytes, T, cheap_ref=sdpa)
    tf = tflops(flops, r.triton_us)
    r.extra = ("ref = torch SDPA on contiguous K/V (includes the gather); " if sdpa else "") + \
        f"{tf:.0f} TFLOP/s ({100 * tf / PEAK_BF16_TFLOPS:.0f}% of bf16 peak)"
    return r


def gdr_cases_of(b: Bench) -> list[tuple[str, list[int], list[bool], list[bool]]]:
    """(label, query_lens, has_initial_state, is_verify) of each gated delta rule case."""
    s = b.shapes
    cases = [(f"decode B={B}", [1] * B, [True] * B, [False] * B) for B in b.batch_sizes if B <= 1024]
    cases += [(f"verify B={B} n=3", [3] * B, [True] * B, [True] * B) for B in b.batch_sizes if B <= 64]
    prefills = [s.prefill, s.prefill_mid] + ([s.prefill_long] if b.long else [])
    cases += [(f"prefill T={T}", [T], [False], [False]) for T in prefills]
    return cases


def gdr_inputs(lens: list[int], verify: list[bool], device: str, Hk: int = MODEL.gdr_hk, Hv: int = MODEL.gdr_hv,
               d: int = MODEL.gdr_d, spare_slots: int = 8) -> dict[str, object]:
    """The op's arguments at the model's layout (q, k unrepeated, bf16; g fp32; states fp32), slots offset
    from 0 so that the pool has untouched neighbours."""
    B, T = len(lens), sum(lens)
    bf16 = torch.bfloat16
    q, k = (torch.randn(T, Hk, d, device=device, dtype=bf16) for _ in range(2))
    spec_len = max((n - 1 for n, x in zip(lens, verify) if x), default=0)
    return dict(q=q, k=k, v=torch.randn(T, Hv, d, device=device, dtype=bf16),
                g=-torch.rand(T, Hv, device=device), beta=torch.rand(T, Hv, device=device).to(bf16),
                ssm_state=torch.randn(B + spare_slots, Hv, d, d, device=device) * 0.1,
                state_slots=torch.arange(B, device=device) + spare_slots // 2,
                spec_ssm=torch.zeros(B + spare_slots, spec_len, Hv, d, d, device=device) if spec_len else None)


def gdr_bytes(lens: list[int], init: list[bool], verify: list[bool], Hk: int = MODEL.gdr_hk, Hv: int = MODEL.gdr_hv,
              d: int = MODEL.gdr_d) -> tuple[int, int]:
    """(minimum bytes moved, FLOPs of the chunked form): tokens' q, k, v, g, beta read and outputs written once;
    states read where continued, written once, plus a verify chunk's intermediate states."""
    T = sum(lens)
    state = Hv * d * d * 4
    nbytes = T * (2 * Hk * d * 2 + Hv * d * 2 + Hv * 4 + Hv * 2 + Hv * d * 2)
    nbytes += sum(state * (int(i) + 1 + (n - 1) * int(v)) for n, i, v in zip(lens, init, verify) if n)
    # per 64-token chunk and value head: K K^T, Q K^T (2 C^2 d each), K S, Q S, K^T V (2 C d^2 each),
    # A @ rhs, attn @ V (2 C^2 d each)
    chunks = sum(-(-n // 64) for n, v in zip(lens, verify) if n > 1 and not v)
    flops = chunks * Hv * (4 * 2 * 64 * 64 * d + 3 * 2 * 64 * d * d)
    return nbytes, flops


def gdr_call(args: dict[str, object], lens: list[int], init: list[bool], verify: list[bool],
             reference_op: bool = False) -> torch.Tensor:
    from qnext.kernels import gated_delta_rule
    from qnext.kernels.gated_delta_rule import reference
    op = reference.gated_delta_rule_varlen if reference_op else gated_delta_rule.gated_delta_rule_varlen
    return op(**args, query_lens=lens, has_initial_state=init, is_verify=verify)


def gdr_cases(b: Bench) -> Iterator[Case]:
    s = b.shapes
    dims = dict(Hk=s.gdr_hk, Hv=s.gdr_hv, d=s.gdr_d)
    for label, lens, init, verify in gdr_cases_of(b):
        yield "gated_delta_rule", label, lambda: gdr_row(b, label, lens, init, verify, dims)


def gdr_row(b: Bench, label: str, lens: list[int], init: list[bool], verify: list[bool],
            dims: dict[str, int]) -> Row:
    args = gdr_inputs(lens, verify, b.device, **dims)
    ref_args = {n: x.clone() if n in ("ssm_state", "spec_ssm") and x is not None else x for n, x in args.items()}
    nbytes, flops = gdr_bytes(lens, init, verify, **dims)
    r = measure(b, "gated_delta_rule", label, lambda: gdr_call(args, lens, init, verify),
                lambda: gdr_call(ref_args, lens, init, verify, reference_op=True), nbytes, sum(lens),
                extra="includes the host->device metadata copy")
    if flops:
        r.extra = f"{tflops(flops, r.triton_us):.1f} TFLOP/s (chunked form); " + r.extra
    if lens == [b.shapes.prefill_mid] and b.shapes == MODEL:
        r.extra += "; " + PUBLISHED_GDR_8K
    return r


def fla_cases(b: Bench) -> Iterator[Case]:
    """Our gated delta rule against flash-linear-attention's, same inputs, same run: chunked prefill of one
    sequence (chunk_gated_delta_rule) and decode batches (fused_recurrent_gated_delta_rule). Same function:
    FLA L2-normalises q and k in the kernel (use_qk_l2norm_in_kernel, x / sqrt(sum x^2 + 1e-6), as ours),
    scales q by dk^-0.5 after it, maps value head h to key head h // (Hv / Hk) (GVA, as our repeat_interleave),
    takes g as the natural-log decay and beta after its sigmoid, and keeps states [N, Hv, dk, dv] fp32. Its
    prefill starts from a zero state (ours: has_initial_state False); its decode reads a copy of our slots'
    states (gathered outside the timing) and writes new ones, as ours updates the slots. The reference column
    is FLA's time, rel_err ours vs FLA's output. Skipped, with the reason, when fla is not importable or there
    is no CUDA (FLA's kernels do not run under the Triton interpreter)."""
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # absent, or an import-time failure (a missing dependency such as einops)
        msg = f"fla not installed: {type(e).__name__}: {e}"

        def skip() -> Row:
            raise Skip(msg)
        yield "fla", "*", skip
        return
    if not b.cuda:
        def skip_cpu() -> Row:
            raise Skip(f"fla {getattr(fla, '__version__', '?')} imports, but its kernels need CUDA")
        yield "fla", "*", skip_cpu
        return
    import importlib.util
    backend = ("FlashQLA (flash_qla importable: FLA dispatches to it)" if importlib.util.find_spec("flash_qla")
               else "Triton")
    about = f"ref = fla {getattr(fla, '__version__', '?')} {{}} ({backend} backend)"
    s = b.shapes
    for T in [s.prefill_mid] + ([s.prefill_long] if b.long else []):
        yield "fla vs ours gdr", f"prefill T={T}", lambda: fla_prefill_row(
            b, T, chunk_gated_delta_rule, about.format("chunk_gated_delta_rule"))
    for B in [B for B in b.batch_sizes if B <= 1024]:
        yield "fla vs ours gdr", f"decode B={B}", lambda: fla_decode_row(
            b, B, fused_recurrent_gated_delta_rule, about.format("fused_recurrent_gated_delta_rule"))


def fla_prefill_row(b: Bench, T: int, chunk_gated_delta_rule: Callable[..., tuple], about: str) -> Row:
    s = b.shapes
    dims = dict(Hk=s.gdr_hk, Hv=s.gdr_hv, d=s.gdr_d)
    lens, init, verify = [T], [False], [False]
    args = gdr_inputs(lens, verify, b.device, **dims)
    q, k, v, g, beta = (args[n][None] for n in ("q", "k", "v", "g", "beta"))  # [1, T, H, ...]: FLA's layout

    def theirs():
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=s.gdr_d ** -0.5, initial_state=None,
                                      output_final_state=True, use_qk_l2norm_in_kernel=True)

    t0 = time.perf_counter()
    o_fla, state_fla = theirs()  # FLA's first call on a shape autotunes its kernels
    if b.cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ours = gdr_call(args, lens, init, verify)
    state_ours = args["ssm_state"][args["state_slots"][0]]
    err, state_err = rel_err(ours, o_fla[0]), rel_err(state_ours, state_fla[0])
    t_ours = b.bench_us(lambda: gdr_call(args, lens, init, verify))
    t_fla = b.bench_us(theirs)
    nbytes, flops = gdr_bytes(lens, init, verify, **dims)
    gbps = nbytes / (t_ours * 1e-6) / 1e9
    extra = (f"{about}; final state rel_err {state_err:.1e}; ours {tflops(flops, t_ours):.1f} TFLOP/s; "
             f"FLA first call {first_s:.1f} s (autotuning, on the first shape)")
    if T == s.prefill_mid and s == MODEL:
        extra += "; " + PUBLISHED_GDR_8K
    return Row("fla vs ours gdr", f"prefill T={T}", t_ours, t_fla, nbytes, gbps, 100 * gbps / b.peak_gbps, err, extra,
               {"fla": t_fla, "fla_first_call_s": first_s})


def fla_decode_row(b: Bench, B: int, fused_recurrent_gated_delta_rule: Callable[..., tuple], about: str) -> Row:
    s = b.shapes
    dims = dict(Hk=s.gdr_hk, Hv=s.gdr_hv, d=s.gdr_d)
    lens, init, verify = [1] * B, [True] * B, [False] * B
    args = gdr_inputs(lens, verify, b.device, **dims)
    slots = args["state_slots"]
    h0 = args["ssm_state"][slots].clone()  # FLA reads [B, Hv, dk, dv]; ours reads the slots in place
    q, k, v, g, beta = (args[n][:, None] for n in ("q", "k", "v", "g", "beta"))  # [B, 1, H, ...]: B sequences

    def theirs():
        return fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, scale=s.gdr_d ** -0.5, initial_state=h0,
                                                output_final_state=True, use_qk_l2norm_in_kernel=True)

    o_fla, state_fla = theirs()
    ours = gdr_call(args, lens, init, verify)
    err, state_err = rel_err(ours, o_fla[:, 0]), rel_err(args["ssm_state"][slots], state_fla)
    t_ours = b.bench_us(lambda: gdr_call(args, lens, init, verify))
    t_fla = b.bench_us(theirs)
    nbytes, _ = gdr_bytes(lens, init, verify, **dims)
    gbps = nbytes / (t_ours * 1e-6) / 1e9
    extra = (f"{about}; new state rel_err {state_err:.1e}; FLA {100 * nbytes / (t_fla * 1e-6) / 1e9 / b.peak_gbps:.0f}%"
             " of the bandwidth bound; ours includes the host->device metadata copy")
    return Row("fla vs ours gdr", f"decode B={B}", t_ours, t_fla, nbytes, gbps, 100 * gbps / b.peak_gbps, err, extra,
               {"fla": t_fla})


def stacked_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> block-128 fp8 [E, N, K] and scales [E, N/128, K/128] (N, K multiples of 128 here, so the
    stacked [E*N, K] matrix has the same blocks as each expert's)."""
    from qnext.kernels.fp8.reference import quantize_weight_block
    E, N, K = w.shape
    q, sc = quantize_weight_block(w.reshape(E * N, K))
    return q.view(E, N, K), sc.view(E, N // 128, K // 128)


def moe_cases(b: Bench) -> Iterator[Case]:
    """The router (logits GEMM + fused softmax/top-k) and the routed experts for T tokens routed by a random
    router, bf16 and FP8 weights. The experts' bytes are the weights of the experts the batch touches plus
    activations; FLOPs 6 T k H I."""
    from qnext.kernels import moe
    from qnext.kernels.moe import reference
    s, dev, bf16 = b.shapes, b.device, torch.bfloat16
    E, H, I, k = s.experts, s.hidden, s.moe_intermediate, s.top_k
    w_gate, w_up = (torch.randn(E, I, H, device=dev, dtype=bf16) * H ** -0.5 for _ in range(2))
    w_down = torch.randn(E, H, I, device=dev, dtype=bf16) * I ** -0.5
    (g8, gs), (u8, us), (d8, ds) = (stacked_fp8(w) for w in (w_gate, w_up, w_down))
    router = torch.randn(E, H, device=dev, dtype=bf16) * 0.05
    for T in b.token_counts():
        x = torch.randn(T, H, device=dev, dtype=bf16)
        shape = f"T={T} E={E} k={k}"
        yield "route", shape, lambda: measure(
            b, "route", shape, lambda: moe.route(x, router, k, True)[0],
            lambda: reference.route(x, router, k, True)[0], router.numel() * 2 + T * H * 2, T)
        weights, ids = reference.route(x, router, k, True)
        touched = int(ids.unique().numel())
        flops = 6 * T * k * H * I
        for kind, ws, scales, itemsize in (("bf16", (w_gate, w_up, w_down), None, 2),
                                           ("fp8", (g8, u8, d8), (gs, us, ds), 1)):
            nbytes = touched * 3 * H * I * itemsize + 2 * T * H * 2

            def moe_row(kind=kind, ws=ws, scales=scales, nbytes=nbytes) -> Row:
                r = measure(b, f"fused_moe {kind}", shape, lambda: moe.fused_moe(x, weights, ids, *ws, scales),
                            lambda: reference.fused_moe(x, weights, ids, *ws, scales), nbytes, T)
                r.extra = f"{touched} experts touched; {tflops(flops, r.triton_us):.0f} TFLOP/s"
                return r
            yield f"fused_moe {kind}", shape, moe_row


BUILDERS: dict[str, Callable[[Bench], Iterator[Case]]] = {
    "gdr": gdr_cases, "fla": fla_cases, "fp8": fp8_cases, "attention": attention_cases, "moe": moe_cases,
    "conv": conv_cases, "norms": norm_cases}


def short_traceback(e: BaseException, limit: int = 4, max_chars: int = 3000) -> str:
    """The last frames and the message; a long message (a Triton compile error's IR dump) keeps its ends."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-limit))
    return text if len(text) <= max_chars else text[:max_chars // 2] + "\n[...]\n" + text[-max_chars // 2:]


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    """A value, or "-" where there is none (not measured, skipped)."""
    return "-" if x is None or x != x else format(x, spec) + suffix


HEAD = (f"{'op':<26} {'shape':<24} {'triton us':>10} {'ref us':>10} {'speedup':>8} {'GB/s':>8} "
        f"{'% bw bound':>10} {'rel_err':>9}  notes")


def row_line(r: Row) -> str:
    speedup = r.reference_us / r.triton_us if r.reference_us and r.triton_us else None
    return (f"{r.op:<26} {r.shape:<24} {fmt(r.triton_us, '.1f'):>10} {fmt(r.reference_us, '.1f'):>10} "
            f"{fmt(speedup, '.1f', 'x'):>8} {fmt(r.gbps, '.0f'):>8} {fmt(r.bound_pct, '.0f', '%'):>10} "
            f"{fmt(r.rel_err, '.1e'):>9}  {r.extra}")


class Report:
    """Rows, errors and skips so far. Each row is printed when measured, and --out rewritten after every case
    (and before it, naming it as `running`), so that a run killed by its timeout leaves all it measured and
    says where it stopped."""

    def __init__(self, out: Path | None, header: dict[str, object]):
        self.out, self.header = out, header
        self.rows: list[Row] = []
        self.errors: list[dict[str, str]] = []
        self.skipped: list[dict[str, str]] = []
        self.running: str | None = None
        self.op_seconds: dict[str, float] = {}  # wall time of each op, compilation included: to plan the next run
        self.finished = False
        self.t0 = time.monotonic()

    def write(self) -> None:
        if self.out is None:
            return
        doc = dict(self.header, rows=[asdict(r) for r in self.rows], errors=self.errors, skipped=self.skipped,
                   running=self.running, op_seconds=self.op_seconds, finished=self.finished,
                   elapsed_s=round(time.monotonic() - self.t0, 1))
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.out)  # a kill mid-write leaves the previous complete file

    def start(self, op: str, shape: str) -> None:
        self.running = f"{op} {shape}"
        self.write()

    def row(self, r: Row) -> None:
        self.rows.append(r)
        print(row_line(r), flush=True)
        self.running = None
        self.write()

    def error(self, op: str, shape: str, e: BaseException) -> None:
        self.errors.append({"op": op, "shape": shape, "error": short_traceback(e)})
        print(f"{op:<26} {shape:<24} ERROR {type(e).__name__}: {squeeze(str(e))}", flush=True)
        self.running = None
        self.write()

    def skip(self, op: str, shape: str, reason: str) -> None:
        self.skipped.append({"op": op, "shape": shape, "reason": reason})
        print(f"{op:<26} {shape:<24} skipped: {reason}", flush=True)
        self.running = None
        self.write()

    def table(self) -> None:
        print("\n" + HEAD)
        print("-" * len(HEAD))
        for r in self.rows:
            print(row_line(r))
        for e in self.errors:
            print(f"ERROR {e['op']} {e['shape']}: {e['error'].strip().splitlines()[-1][:300]}")
        for s in self.skipped:
            print(f"skipped {s['op']} {s['shape']}: {s['reason']}")
        sys.stdout.flush()


def device_alive(b: Bench) -> str | None:
    """None, or why the CUDA context is unusable (an illegal access poisons it: every later case would fail)."""
    if not b.cuda:
        return None
    try:
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"CUDA context lost: {squeeze(str(e))}"


def run_op(name: str, b: Bench, report: Report, deadline: float | None) -> bool:
    """Every case of one op, each on its own. False when the run must stop (time budget spent, device lost)."""
    cases = BUILDERS[name](b)
    while True:
        if deadline is not None and time.monotonic() > deadline:
            report.skip(name, "(rest)", "time budget spent")
            return False
        try:
            op, shape, run = next(cases)
        except StopIteration:
            return True
        except Exception as e:  # the op's shared set-up failed: its remaining cases cannot run
            report.error(name, "(setup)", e)
            return device_alive(b) is None
        report.start(op, shape)
        try:
            r = run()
        except Skip as e:
            report.skip(op, shape, str(e))
        except Exception as e:
            report.error(op, shape, e)
        else:
            report.row(r)
            continue
        lost = device_alive(b)  # after the except block, which held the failed case's tensors through `e`
        if lost:
            report.skip("*", "(rest)", lost)
            return False
        if b.cuda:
            torch.cuda.empty_cache()  # an out-of-memory case leaves the next ones room


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=DEFAULT_OPS, help=f"comma list, run in this order; default {DEFAULT_OPS}")
    p.add_argument("--batch-sizes", default=None,
                   help=f"decode batches / token counts; default {MODEL.batch_sizes} ({SMALL.batch_sizes} with "
                        "--small); the token-count ops (fp8, norms, moe) also run at the prefill size")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth bound; default: measured copy")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here (after every case)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: the Triton kernels through the interpreter (TRITON_INTERPRET=1); use with --small")
    p.add_argument("--small", action="store_true", help="shrink every dimension (a plumbing check, not a benchmark)")
    p.add_argument("--quick", action="store_true",
                   help="batch sizes 1,256, no 32K cases, no prefill-size GEMM/norm/MoE rows, references not timed, "
                        "warmup 5 / rep 20 ms")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup (default 10, --quick 5)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench measuring time (default 50, --quick 20)")
    p.add_argument("--max-reference-tokens", type=int, default=None,
                   help="time the torch reference only up to this many tokens (default 4096, --quick 0)")
    p.add_argument("--max-check-tokens", type=int, default=32768,
                   help="run the reference once for rel_err only up to this many tokens (default 32768)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no case after this many seconds; the rest are recorded as skipped (0: no limit)")
    p.add_argument("--fla-path", default=None, help="a directory (e.g. an unpacked fla wheel) put first on sys.path")
    return p.parse_args(argv)


def make_bench(args: argparse.Namespace) -> Bench:
    shapes = SMALL if args.small else MODEL
    sizes = args.batch_sizes or ("1,256" if args.quick and not args.small else shapes.batch_sizes)
    return Bench(device=args.device, shapes=shapes, batch_sizes=[int(x) for x in sizes.split(",")], peak_gbps=0.0,
                 warmup_ms=args.warmup_ms or (5.0 if args.quick else 10.0),
                 rep_ms=args.rep_ms or (20.0 if args.quick else 50.0),
                 max_reference_tokens=(args.max_reference_tokens if args.max_reference_tokens is not None
                                       else 0 if args.quick else 4096),
                 max_check_tokens=args.max_check_tokens, long=not args.quick, prefill_batches=not args.quick)


def on_sigterm(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = [op for op in args.ops.split(",") if op.strip() not in BUILDERS]
    if unknown:
        sys.exit(f"unknown op(s) {unknown}: choose from {', '.join(BUILDERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/kernel_bench.py times the Triton kernels on a GPU: no CUDA device is visible here, nothing to "
                 "measure. (--device cpu --small runs every case through the Triton interpreter, to check the "
                 "plumbing; tests/test_triton_*.py check the kernels.)")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (the kernels import it lazily)
    if args.fla_path:
        sys.path.insert(0, args.fla_path)
    from qnext.kernels.dispatch import force_triton
    torch.manual_seed(0)
    b = make_bench(args)
    b.peak_gbps = args.peak_gbps or copy_gbps(b)
    name = torch.cuda.get_device_name() if b.cuda else "cpu (Triton interpreter)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not importable: {e}"
    header = {"device": name, "torch": torch.__version__, "triton": triton_version, "peak_gbps": b.peak_gbps,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "shapes": "small" if args.small else "model"}
    print(f"{name}  torch {torch.__version__}  triton {triton_version}  bandwidth bound {b.peak_gbps:.0f} GB/s"
          f"{' (given)' if args.peak_gbps else ' (measured copy)'}; do_bench warmup {b.warmup_ms:g} / rep "
          f"{b.rep_ms:g} ms; references timed up to {b.max_reference_tokens} tokens, checked up to "
          f"{b.max_check_tokens}\n", flush=True)
    print(HEAD)
    print("-" * len(HEAD), flush=True)
    report = Report(args.out, header)
    deadline = time.monotonic() + args.time_budget_s if args.time_budget_s > 0 else None
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = None
    try:
        with force_triton(), torch.inference_mode():
            ops = [op.strip() for op in args.ops.split(",")]
            for i, op in enumerate(ops):
                t_op = time.monotonic()
                go_on = run_op(op, b, report, deadline)
                report.op_seconds[op] = round(time.monotonic() - t_op, 1)
                print(f"[{op}: {report.op_seconds[op]:.1f} s, {time.monotonic() - report.t0:.0f} s in all]", flush=True)
                if not go_on:
                    for rest in ops[i + 1:]:
                        report.skip(rest, "*", "not started: the run stopped (see above)")
                    break
                if b.cuda:
                    torch.cuda.empty_cache()
        report.finished = True
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted = f"interrupted ({e or type(e).__name__}) during {report.running}"
        report.skipped.append({"op": "*", "shape": "(rest)", "reason": interrupted})
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    report.write()
    report.table()
    if interrupted:
        print(interrupted)
    return 1 if report.errors or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
