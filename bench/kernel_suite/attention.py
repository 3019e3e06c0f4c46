"""Paged attention cases: decodes over a long context and one-sequence prefills, K/V in shuffled blocks."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.kernel_suite.measure import PEAK_BF16_TFLOPS, Bench, Case, Row, Shapes, measure, tflops


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
