"""Triton gated delta rule vs the torch reference over varlen batches: chunked prefills of lengths around the
chunk (1, 63, 64, 65, 200), decodes, speculative-verify chunks (every intermediate state in spec_ssm), an empty
sequence, GQA (two value heads per key head), odd head dims; NaN-poisoned outputs, spec pools and fresh
sequences' slots; whole state pools compared (untouched slots unchanged). On a machine without CUDA the kernels
run on CPU through the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels below
triton = pytest.importorskip("triton", reason="triton is not installed")

from conftest import require_triton  # noqa: E402

from qnext.kernels import dispatch, gated_delta_rule  # noqa: E402
from qnext.kernels.gated_delta_rule import reference  # noqa: E402

S, J = 12, 4  # slots in the pool, spec states per slot
# fp32 inputs: the interpreter multiplies in fp32; on the GPU the chunked path's dots run in TF32
# (triton_chunk.launch_config), 2^-11 per product.
FP32_TOL = 1e-5 if DEVICE == "cpu" else 2e-3


@pytest.fixture(scope="module", autouse=True)
def triton_runs():
    require_triton(DEVICE)  # a skip only where Triton cannot run at all; an error of our kernels fails its test


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def inputs(T: int, Hk: int, H: int, dk: int, dv: int, dtype: torch.dtype, gen: torch.Generator):
    """q, k, v as the conv leaves them (any scale: the kernels normalise q, k), g <= 0 as the gates make it
    (some strongly decaying heads), beta in (0, 1)."""
    q, k = (torch.randn(T, Hk, dk, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    v = torch.randn(T, H, dv, generator=gen).to(dtype).to(DEVICE)
    g = (-torch.rand(T, H, generator=gen) * torch.tensor([0.05, 0.5, 2.0, 8.0]).repeat(H)[:H]).to(DEVICE)
    beta = torch.rand(T, H, generator=gen).to(dtype).to(DEVICE)
    return q, k, v, g, beta


def run_both(lens: list[int], init: list[bool], verify: list[bool] | None = None, Hk: int = 2, H: int = 4,
             dk: int = 16, dv: int = 32, dtype: torch.dtype = torch.float32,
             state_dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, float]:
    """Triton and reference on the same inputs and pools; returns the relative errors (out, state, spec)."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(lens), sum(lens)
    q, k, v, g, beta = inputs(T, Hk, H, dk, dv, dtype, gen)
    pool = torch.randn(S, H, dk, dv, generator=gen).to(state_dtype).to(DEVICE)
    slots = torch.randperm(S, generator=gen)[:B].to(DEVICE)
    for i in range(B):
        if not init[i]:  # a fresh sequence must not read its slot
            pool[slots[i]] = float("nan")
    spec = torch.full((S, J, H, dk, dv), float("nan"), dtype=state_dtype, device=DEVICE)
    pool_ref, spec_ref = pool.clone(), spec.clone()
    out = torch.full((T, H, dv), float("nan"), dtype=dtype, device=DEVICE)
    from qnext.kernels.gated_delta_rule.triton_gdr import gdr_varlen_fwd
    y = gdr_varlen_fwd(q, k, v, g, beta, pool, slots, lens, init, verify, spec, out=out)
    want = reference.gated_delta_rule_varlen(q, k, v, g, beta, pool_ref, slots, lens, init, verify, spec_ref)
    assert y is out and torch.isfinite(y).all()
    untouched = [i for i in range(S) if i not in slots.tolist()]
    assert torch.equal(pool[untouched], pool_ref[untouched])
    empty = [slots[i].item() for i in range(B) if lens[i] == 0]
    assert torch.equal(pool[empty].isnan(), pool_ref[empty].isnan())  # a 0-token sequence leaves its slot be
    written = [slots[i].item() for i in range(B) if lens[i] > 0]
    assert torch.isfinite(pool[written]).all()
    assert torch.equal(spec.isnan(), spec_ref.isnan())  # exactly the reference's spec states are written
    errs = {"out": rel_err(y, want), "state": rel_err(pool[written], pool_ref[written])}
    if verify and any(verify):
        errs["spec"] = rel_err(spec.nan_to_num(), spec_ref.nan_to_num())
    out_tol = FP32_TOL if dtype == torch.float32 else 1e-2  # bf16/fp16 outputs: an ulp of rounding
    state_tol = FP32_TOL if state_dtype == torch.float32 else 1e-2
    assert errs["out"] < out_tol and errs["state"] < state_tol and errs.get("spec", 0.0) < state_tol, errs
    return errs


def test_varlen_prefill_decode_verify(report) -> None:
    """Every path in one call: prefills around the chunk, fresh and continued, decodes, two verify chunks, an
    empty sequence."""
    lens = [1, 63, 64, 1, 65, 200, 3, 0, 4]
    init = [True, False, True, False, True, True, True, False, True]
    verify = [False] * 6 + [True, False, True]
    errs = run_both(lens, init, verify)
    report("triton gated delta rule fp32, mixed varlen batch, rel err", {k: f"{e:.1e}" for k, e in errs.items()})


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_half_inputs(dtype: torch.dtype, state_dtype: torch.dtype, report) -> None:
    errs = run_both([65, 1, 3, 2], [True, True, True, False], [False, False, True, False], dtype=dtype,
                    state_dtype=state_dtype, seed=1)
    report(f"triton gated delta rule {dtype} in, {state_dtype} state, rel err",
           {k: f"{e:.1e}" for k, e in errs.items()})


def test_odd_head_dims() -> None:
    """dk = 24, dv = 40: masked head dims, two state column blocks, the second partial; one key head for two
    value heads."""
    run_both([70, 1, 2], [False, True, True], [False, False, True], Hk=1, H=2, dk=24, dv=40, seed=2)


def test_decode_only() -> None:
    run_both([1] * 7, [True, False] * 3 + [True], Hk=2, H=4, seed=3)


def test_verify_chunks_only() -> None:
    """Up to J + 1 tokens each; the 1-token one is a plain decode (nothing to roll back to)."""
    run_both([5, 1, 3, 2], [True] * 4, [True] * 4, seed=4)


def test_no_gqa_and_all_prefill() -> None:
    run_both([2, 64, 17], [False, True, False], Hk=3, H=3, dk=32, dv=16, seed=5)


def test_chunked_prefill_equals_one_shot() -> None:
    """A 200-token prompt in chunks [64, 1, 70, 65] through the public function, each continuing from the pool,
    gives the one-shot result (prefill, decode, prefill not aligned to the chunk)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v, g, beta = inputs(200, 2, 4, 16, 32, torch.float32, gen)
    slot = torch.tensor([2], device=DEVICE)
    one_pool = torch.full((S, 4, 16, 32), float("nan"), device=DEVICE)
    pool = one_pool.clone()
    with dispatch.force_triton():
        one = gated_delta_rule.gated_delta_rule_varlen(q, k, v, g, beta, one_pool, slot, [200], [False])
        parts, s = [], 0
        for i, n in enumerate([64, 1, 70, 65]):
            r = slice(s, s + n)
            parts.append(gated_delta_rule.gated_delta_rule_varlen(q[r], k[r], v[r], g[r], beta[r], pool, slot, [n],
                                                                   [i > 0]))
            s += n
    assert rel_err(torch.cat(parts), one) < FP32_TOL
    assert rel_err(pool[2], one_pool[2]) < FP32_TOL
    assert pool[[0, 1, 3]].isnan().all()


def test_fp64_takes_the_reference() -> None:
    """fp64 runs the reference even inside force_triton (the kernels compute in fp32)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, g, beta = (x.double() for x in inputs(3, 1, 1, 16, 16, torch.float32, gen))
    pool, want_pool = (torch.zeros(2, 1, 16, 16, dtype=torch.float64, device=DEVICE) for _ in range(2))
    slot = torch.tensor([1], device=DEVICE)
    with dispatch.force_triton():
        y = gated_delta_rule.gated_delta_rule_varlen(q, k, v, g, beta, pool, slot, [3], [False])
    want = reference.gated_delta_rule_varlen(q, k, v, g, beta, want_pool, slot, [3], [False])
    assert y.dtype == torch.float64 and torch.equal(y, want) and torch.equal(pool, want_pool)
