"""Norm cases: RMSNorm over the hidden size (alone and with the residual add), the q/k head norm and the gated
norm over the value heads."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.kernel_suite.measure import Bench, Case, measure


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
