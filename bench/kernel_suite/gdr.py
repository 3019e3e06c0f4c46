"""Gated delta rule cases (decode, speculative verify, chunked prefill), and a case's inputs, bytes and FLOPs,
which the flash-linear-attention comparison shares."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.kernel_suite.measure import MODEL, PUBLISHED_GDR_8K, Bench, Case, Row, measure, tflops


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
