"""MoE cases: the router and the routed experts, bf16 and FP8 weights."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.kernel_suite.measure import Bench, Case, Row, measure, tflops


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
