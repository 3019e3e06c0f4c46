"""Causal conv1d cases: decode batches (one token per sequence, continuing its state) and a prefill."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.kernel_suite.measure import Bench, Case, measure


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
