"""Our gated delta rule against flash-linear-attention's, same inputs, same run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from bench.bench_common import rel_err
from bench.kernel_suite.gdr import gdr_bytes, gdr_call, gdr_inputs
from bench.kernel_suite.measure import MODEL, PUBLISHED_GDR_8K, Bench, Case, Row, Skip, tflops


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
