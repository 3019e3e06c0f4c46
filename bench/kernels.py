"""Triton kernels vs their torch references at Qwen3-Next-80B-A3B's shapes, on a CUDA device.

For each case: median time (`triton.testing.do_bench`) of the Triton path and of the torch reference, the bytes
the op must move at least (read inputs and weights once, write outputs once), the bandwidth that implies, and
the fraction of the memory-bandwidth bound reached (bound = bytes / the device's copy bandwidth, measured here
with a large device-to-device copy unless --peak-gbps is given). GEMMs also show TFLOP/s and the time of a
plain bf16 matmul of the same shape. The rel_err column compares the Triton output with the reference's.

    python bench/kernels.py                     # every op; a few minutes on one GPU
    python bench/kernels.py --ops fp8 --batch-sizes 1,256
    python bench/kernels.py --peak-gbps 4800 --out kernels.json

Shapes (FACTS §1, §2.2, §3): hidden 2048; FP8 linears in_proj_qkvz [12288, 2048], q_proj [8192, 2048],
out_proj/o_proj [2048, 4096], shared-expert up [512, 2048] and down [2048, 512]; norms over hidden 2048
(optionally with the residual add), q/k norm (16 heads x 256) and the gated norm (32 value heads x 128); conv
over conv_dim 8192, kernel 4; gated delta rule with 16 key / 32 value heads of 128, fp32 states; paged attention
with 16 query / 2 KV heads of 256 over 16-token blocks; the router and routed MoE with 512 experts, top-10,
moe_intermediate 512 (bf16 and FP8 weights). Decode batches of 1/8/64/256 tokens (conv, gated delta rule,
attention: that many sequences of one token; attention over a 4096-token context, and batch 1 over 32768),
speculative-verify batches of 3-token chunks (gated delta rule, up to 64 sequences), a 4096-token prefill, and
32768 for the gated delta rule and attention.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from anywhere without installing

import torch  # noqa: E402

HIDDEN, CONV_DIM, CONV_K = 2048, 8192, 4
HEADS_Q, HEADS_KV, HEAD_DIM, KV_BLOCK = 16, 2, 256, 16
NUM_EXPERTS, TOP_K, MOE_INTERMEDIATE = 512, 10, 512
DECODE_CONTEXT = 4096  # context of every sequence in the attention decode rows
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16; the bound for the compute-bound rows (prefill, big MoE)
FP8_LINEARS = {"in_proj_qkvz": (12288, 2048), "q_proj": (8192, 2048), "out_proj": (2048, 4096),
               "shared_up": (512, 2048), "shared_down": (2048, 512)}
PREFILL = 4096
PREFILL_LONG = 32768
GDR_HK, GDR_HV, GDR_D = 16, 32, 128  # key heads, value heads, dk = dv


@dataclass
class Row:
    op: str
    shape: str
    triton_us: float
    reference_us: float
    min_bytes: int
    gbps: float
    bound_pct: float  # bandwidth-bound time / Triton time
    rel_err: float
    extra: str = ""


def bench_us(fn: Callable[[], object]) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def copy_gbps() -> float:
    """Device copy bandwidth: read + write of a 2 GiB buffer."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_us(lambda: dst.copy_(src)) * 1e-6) / 1e9


def row(op: str, shape: str, fast: Callable[[], torch.Tensor], ref: Callable[[], torch.Tensor], nbytes: int,
        peak_gbps: float, extra: str = "") -> Row:
    err = rel_err(fast(), ref())
    t_fast, t_ref = bench_us(fast), bench_us(ref)
    gbps = nbytes / (t_fast * 1e-6) / 1e9
    return Row(op, shape, t_fast, t_ref, nbytes, gbps, 100 * gbps / peak_gbps, err, extra)


def fp8_rows(batch_sizes: list[int], peak: float) -> list[Row]:
    from kernels import fp8
    from kernels.fp8 import reference
    from kernels.fp8.triton_gemm import fp8_block_gemm_fwd
    rows = []
    for M in batch_sizes:
        x = torch.randn(M, HIDDEN, dtype=torch.bfloat16, device="cuda")
        nbytes = M * HIDDEN * 2 + M * HIDDEN + M * (HIDDEN // 128) * 4
        rows.append(row("fp8_quant", f"[{M}, {HIDDEN}]", lambda: fp8.per_token_group_quant(x)[0],
                        lambda: reference.per_token_group_quant(x)[0], nbytes, peak))
    for name, (N, K) in FP8_LINEARS.items():
        w, ws = reference.quantize_weight_block(torch.randn(N, K, device="cuda") * 0.02)
        w_bf16 = reference.dequantize_weight_block(w, ws).to(torch.bfloat16)
        for M in batch_sizes:
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            xq, xs = fp8.per_token_group_quant(x)
            nbytes = N * K + ws.numel() * 4 + M * K * 2 + M * N * 2
            flops = 2 * M * N * K
            t_gemm = bench_us(lambda: fp8_block_gemm_fwd(xq, xs, w, ws))
            t_bf16 = bench_us(lambda: x @ w_bf16.t())
            r = row(f"fp8_linear {name}", f"M={M} N={N} K={K}", lambda: fp8.fp8_block_linear(x, w, ws),
                    lambda: reference.fp8_block_linear(x, w, ws), nbytes, peak)
            r.extra = (f"{flops / (r.triton_us * 1e-6) / 1e12:.0f} TFLOP/s; gemm alone {t_gemm:.1f} us; "
                       f"bf16 matmul {t_bf16:.1f} us")
            rows.append(r)
    return rows


def norm_rows(batch_sizes: list[int], peak: float) -> list[Row]:
    from kernels import norms
    from kernels.norms import reference
    rows = []
    w = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.1
    wh = torch.randn(256, device="cuda", dtype=torch.bfloat16) * 0.1
    wg = torch.ones(128, device="cuda", dtype=torch.bfloat16)
    for T in batch_sizes:
        x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x)
        rows.append(row("rms_norm", f"[{T}, {HIDDEN}]", lambda: norms.rms_norm_zero_centred(x, w, 1e-6),
                        lambda: reference.rms_norm_zero_centred(x, w, 1e-6), 2 * x.numel() * 2, peak))
        rows.append(row("add_rms_norm", f"[{T}, {HIDDEN}]",
                        lambda: norms.add_rms_norm_zero_centred(x, r, w, 1e-6)[0],
                        lambda: reference.rms_norm_zero_centred(x + r, w, 1e-6), 4 * x.numel() * 2, peak))
        q = torch.randn(T, 16, 256, device="cuda", dtype=torch.bfloat16)
        rows.append(row("q_norm", f"[{T}, 16, 256]", lambda: norms.rms_norm_zero_centred(q, wh, 1e-6),
                        lambda: reference.rms_norm_zero_centred(q, wh, 1e-6), 2 * q.numel() * 2, peak))
        o, z = (torch.randn(T, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        rows.append(row("gated_rms_norm", f"[{T}, 32, 128]", lambda: norms.gated_rms_norm(o, z, wg, 1e-6),
                        lambda: reference.gated_rms_norm(o, z, wg, 1e-6), 3 * o.numel() * 2, peak))
    return rows


def conv_rows(batch_sizes: list[int], peak: float) -> list[Row]:
    from kernels import conv1d
    from kernels.conv1d import reference
    rows = []
    w = torch.randn(CONV_DIM, CONV_K, device="cuda", dtype=torch.bfloat16) * 0.5
    cases = [(f"decode B={B}", [1] * B, [True] * B) for B in batch_sizes if B <= 1024]
    cases.append((f"prefill T={PREFILL}", [PREFILL], [False]))
    for label, lens, init in cases:
        B, T = len(lens), sum(lens)
        x = torch.randn(T, CONV_DIM, device="cuda", dtype=torch.bfloat16)
        pool = torch.randn(B + 8, CONV_DIM, CONV_K - 1, device="cuda", dtype=torch.bfloat16)
        pool_ref = pool.clone()
        slots = torch.arange(B, device="cuda") + 4
        nbytes = 2 * T * CONV_DIM * 2 + 2 * B * CONV_DIM * (CONV_K - 1) * 2 + CONV_DIM * CONV_K * 2
        rows.append(row("causal_conv1d", label,
                        lambda: conv1d.causal_conv1d_varlen(x, w, pool, slots, lens, init),
                        lambda: reference.causal_conv1d_varlen(x, w, pool_ref, slots, lens, init), nbytes, peak,
                        extra="includes the host->device metadata copy"))
    return rows


def paged_kv(lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V pools holding `lens` tokens per sequence in shuffled blocks, and the block tables [B, max_blocks]."""
    need = [-(-n // KV_BLOCK) for n in lens]
    perm = torch.randperm(sum(need), device="cuda").to(torch.int32)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device="cuda")
    s = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[s:s + n]
        s += n
    shape = (sum(need), KV_BLOCK, HEADS_KV, HEAD_DIM)
    return (torch.randn(shape, device="cuda", dtype=torch.bfloat16),
            torch.randn(shape, device="cuda", dtype=torch.bfloat16), tables)


def attention_rows(batch_sizes: list[int], peak: float) -> list[Row]:
    """Decodes (batch B, each over DECODE_CONTEXT tokens) and one-sequence prefills of 4K and 32K tokens: this
    step's k/v written into the pool, then attention over it. At 32K the paged reference would materialise
    64 GB of scores, so torch's SDPA (flash, causal, GQA) over contiguous K/V stands in as the reference."""
    import torch.nn.functional as F

    from kernels import attention
    from kernels.attention import reference
    rows = []
    scale = HEAD_DIM ** -0.5
    cases = [(f"decode B={B} ctx={DECODE_CONTEXT}", [1] * B, [DECODE_CONTEXT] * B) for B in batch_sizes if B <= 1024]
    cases.append((f"decode B=1 ctx={PREFILL_LONG}", [1], [PREFILL_LONG]))  # split-KV territory
    cases += [(f"prefill T={n}", [n], [n]) for n in (PREFILL, PREFILL_LONG)]
    for label, qlens, ctx in cases:
        T = sum(qlens)
        k_cache, v_cache, tables = paged_kv(ctx)
        q = torch.randn(T, HEADS_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(T, HEADS_KV, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        pos = torch.tensor([c - n + j for n, c in zip(qlens, ctx) for j in range(n)], device="cuda")
        seq = torch.repeat_interleave(torch.arange(len(qlens), device="cuda"), torch.tensor(qlens, device="cuda"))
        slots = (tables[seq, pos // KV_BLOCK].long() * KV_BLOCK + pos % KV_BLOCK)

        def fast():
            return attention.paged_attention_varlen(q, k, v, k_cache, v_cache, slots, tables, qlens, ctx, scale)

        if T <= PREFILL:
            def ref():
                return reference.paged_attention_varlen(q, k, v, k_cache, v_cache, slots, tables, qlens, ctx, scale)
            note = ""
        else:
            def ref():
                kc = k_cache[tables[0].long()].flatten(0, 1)[:T].transpose(0, 1)[None]  # [1, Hkv, T, D]
                vc = v_cache[tables[0].long()].flatten(0, 1)[:T].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc, vc, is_causal=True, scale=scale,
                                                   enable_gqa=True)
                return o[0].transpose(0, 1)
            note = "ref = torch SDPA on contiguous K/V; "
        kv_read = sum(ctx) * HEADS_KV * HEAD_DIM * 2 * 2
        nbytes = kv_read + 2 * q.numel() * 2 + 2 * k.numel() * 2
        flops = sum(4 * HEADS_Q * HEAD_DIM * n * (c - n + (n + 1) / 2) for n, c in zip(qlens, ctx))
        r = row("paged_attention", label, fast, ref, nbytes, peak)
        tflops = flops / (r.triton_us * 1e-6) / 1e12
        r.extra = note + f"{tflops:.0f} TFLOP/s ({100 * tflops / PEAK_BF16_TFLOPS:.0f}% of bf16 peak)"
        rows.append(r)
    return rows


def gdr_cases(batch_sizes: list[int]) -> list[tuple[str, list[int], list[bool], list[bool]]]:
    """(label, query_lens, has_initial_state, is_verify) of each gated delta rule case."""
    cases = [(f"decode B={B}", [1] * B, [True] * B, [False] * B) for B in batch_sizes if B <= 1024]
    cases += [(f"verify B={B} n=3", [3] * B, [True] * B, [True] * B) for B in batch_sizes if B <= 64]
    cases += [(f"prefill T={T}", [T], [False], [False]) for T in (PREFILL, PREFILL_LONG)]
    return cases


def gdr_inputs(lens: list[int], verify: list[bool], device: str, Hk: int = GDR_HK, Hv: int = GDR_HV,
               d: int = GDR_D, spare_slots: int = 8) -> dict[str, object]:
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


def gdr_bytes(lens: list[int], init: list[bool], verify: list[bool], Hk: int = GDR_HK, Hv: int = GDR_HV,
              d: int = GDR_D) -> tuple[int, int]:
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


def gdr_rows(batch_sizes: list[int], peak: float) -> list[Row]:
    from kernels import gated_delta_rule
    from kernels.gated_delta_rule import reference
    rows = []
    for label, lens, init, verify in gdr_cases(batch_sizes):
        args = gdr_inputs(lens, verify, "cuda")
        ref_args = {n: x.clone() if n in ("ssm_state", "spec_ssm") and x is not None else x for n, x in args.items()}
        nbytes, flops = gdr_bytes(lens, init, verify)
        r = row("gated_delta_rule", label,
                lambda: gated_delta_rule.gated_delta_rule_varlen(**args, query_lens=lens, has_initial_state=init,
                                                                 is_verify=verify),
                lambda: reference.gated_delta_rule_varlen(**ref_args, query_lens=lens, has_initial_state=init,
                                                          is_verify=verify), nbytes, peak,
                extra="includes the host->device metadata copy")
        if flops:
            r.extra = f"{flops / (r.triton_us * 1e-6) / 1e12:.1f} TFLOP/s (chunked form); " + r.extra
        rows.append(r)
    return rows


def stacked_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> block-128 fp8 [E, N, K] and scales [E, N/128, K/128] (N, K multiples of 128 here, so the
    stacked [E*N, K] matrix has the same blocks as each expert's)."""
    from kernels.fp8.reference import quantize_weight_block
    E, N, K = w.shape
    q, s = quantize_weight_block(w.reshape(E * N, K))
    return q.view(E, N, K), s.view(E, N // 128, K // 128)


def moe_rows(batch_sizes: list[int], peak: float) -> list[Row]:
    """The router (logits GEMM + fused softmax/top-k) and the routed experts for T tokens routed by a random
    router, bf16 and FP8 weights. The experts' bytes are the weights of the experts the batch touches plus
    activations; FLOPs 6 T k H I."""
    from kernels import moe
    from kernels.moe import reference
    rows = []
    E, H, I = NUM_EXPERTS, HIDDEN, MOE_INTERMEDIATE
    w_gate, w_up = (torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5 for _ in range(2))
    w_down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    (g8, gs), (u8, us), (d8, ds) = (stacked_fp8(w) for w in (w_gate, w_up, w_down))
    router = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) * 0.05
    for T in batch_sizes:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        weights, ids = reference.route(x, router, TOP_K, True)
        rows.append(row("route", f"T={T} E={E} k={TOP_K}", lambda: moe.route(x, router, TOP_K, True)[0],
                        lambda: reference.route(x, router, TOP_K, True)[0], router.numel() * 2 + T * H * 2, peak))
        touched = int(ids.unique().numel())
        flops = 6 * T * TOP_K * H * I
        for kind, ws, scales, itemsize in (("bf16", (w_gate, w_up, w_down), None, 2),
                                           ("fp8", (g8, u8, d8), (gs, us, ds), 1)):
            nbytes = touched * 3 * H * I * itemsize + 2 * T * H * 2
            r = row(f"fused_moe {kind}", f"T={T} E={E} k={TOP_K}",
                    lambda: moe.fused_moe(x, weights, ids, *ws, scales),
                    lambda: reference.fused_moe(x, weights, ids, *ws, scales), nbytes, peak)
            tflops = flops / (r.triton_us * 1e-6) / 1e12
            r.extra = f"{touched} experts touched; {tflops:.0f} TFLOP/s"
            rows.append(r)
    return rows


def print_table(rows: list[Row]) -> None:
    head = (f"{'op':<26} {'shape':<24} {'triton us':>10} {'ref us':>10} {'speedup':>8} {'GB/s':>8} "
            f"{'% bw bound':>10} {'rel_err':>9}  notes")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.op:<26} {r.shape:<24} {r.triton_us:>10.1f} {r.reference_us:>10.1f} "
              f"{r.reference_us / r.triton_us:>7.1f}x {r.gbps:>8.0f} {r.bound_pct:>9.0f}% {r.rel_err:>9.1e}  {r.extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default="fp8,norms,conv,gdr,attention,moe",
                   help="comma list of fp8, norms, conv, gdr, attention, moe")
    p.add_argument("--batch-sizes", default=f"1,8,64,256,{PREFILL}", help="token counts (decode batches, prefill)")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth bound; default: measured copy")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py times the Triton kernels on a GPU: no CUDA device is visible here, nothing to "
                 "measure. (On CPU the kernels are checked, not timed, by tests/test_triton_*.py under "
                 "TRITON_INTERPRET=1.)")
    from kernels.dispatch import force_triton
    torch.manual_seed(0)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    peak = args.peak_gbps or copy_gbps()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bandwidth bound {peak:.0f} GB/s"
          f"{' (given)' if args.peak_gbps else ' (measured copy)'}\n")
    builders = {"fp8": fp8_rows, "norms": norm_rows, "conv": conv_rows, "gdr": gdr_rows,
                "attention": attention_rows, "moe": moe_rows}
    rows: list[Row] = []
    with force_triton(), torch.inference_mode():
        for op in args.ops.split(","):
            rows += builders[op.strip()](batch_sizes, peak)
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "peak_gbps": peak,
                                        "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
