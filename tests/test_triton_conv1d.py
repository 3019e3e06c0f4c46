"""Triton causal conv1d + SiLU vs the torch reference over varlen batches: decodes, prefills of lengths around the
token tile (1, 63, 64, 65, 200), sequences shorter than the state, a speculative-verify chunk; NaN-poisoned outputs
and spec pools, whole state pools compared (untouched slots unchanged). On a machine without CUDA the kernel runs
on CPU through the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernel below
triton = pytest.importorskip("triton", reason="triton is not installed")

from conftest import require_triton  # noqa: E402

from qnext.kernels import conv1d, dispatch  # noqa: E402
from qnext.kernels.conv1d import reference  # noqa: E402

K, S = 4, 12


@pytest.fixture(scope="module", autouse=True)
def triton_runs():
    require_triton(DEVICE)  # a skip only where Triton cannot run at all; an error of our kernels fails its test


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def same(got: torch.Tensor, want: torch.Tensor, rtol: float = 0.0) -> bool:
    """Equal (bitwise by default), NaN where NaN (the untouched parts of NaN-filled pools)."""
    return got.shape == want.shape and torch.equal(got.isnan(), want.isnan()) and \
        torch.allclose(got.nan_to_num(0.0), want.nan_to_num(0.0), rtol=rtol, atol=0.0)


def run_both(lens: list[int], init: list[bool], D: int, dtype: torch.dtype, state_dtype: torch.dtype,
             verify: list[bool] | None = None, seed: int = 0) -> None:
    """Triton and reference on the same inputs; outputs close, state and spec pools identical."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(lens), sum(lens)
    x = torch.randn(T, D, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(D, K, generator=gen) * 0.5).to(dtype).to(DEVICE)
    pool = torch.randn(S, K - 1, D, generator=gen).to(state_dtype).to(DEVICE)
    slots = torch.randperm(S, generator=gen)[:B].to(DEVICE)
    spec = torch.full((S, 4, K - 1, D), float("nan"), dtype=state_dtype, device=DEVICE) if verify else None
    pool_ref, spec_ref = pool.clone(), spec.clone() if verify else None
    out = torch.full((T, D), float("nan"), dtype=dtype, device=DEVICE)
    from qnext.kernels.conv1d.triton_conv import causal_conv1d_varlen_fwd
    y = causal_conv1d_varlen_fwd(x, w, pool, slots, lens, init, verify, spec, out=out)
    want = reference.causal_conv1d_varlen(x, w, pool_ref, slots, lens, init, verify, spec_ref)
    assert y is out and torch.isfinite(y).all()
    assert rel_err(y, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    # States are copies of inputs, so equal bit for bit; but an fp32 state re-read in bf16 (like the reference
    # does) is rounded towards zero by the interpreter, to nearest on the GPU: one bf16 ulp apart.
    rtol = 2 ** -7 if DEVICE == "cpu" and state_dtype.itemsize > dtype.itemsize else 0.0
    untouched = [i for i in range(S) if i not in slots.tolist()]
    assert torch.equal(pool[untouched], pool_ref[untouched])
    assert same(pool, pool_ref, rtol)
    if verify:
        assert same(spec, spec_ref, rtol)


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
def test_varlen_prefill_decode_verify(dtype: torch.dtype, state_dtype: torch.dtype) -> None:
    lens = [1, 63, 64, 1, 65, 200, 3, 4]
    init = [True, False, True, False, True, False, True, True]
    verify = [False] * 7 + [True]
    run_both(lens, init, 136, dtype, state_dtype, verify)  # D = 136: three 64-channel tiles, the last masked


@pytest.mark.parametrize("lens,init", [([1] * 9, [True, False] * 4 + [True]),  # decode only: one-token tiles
                                       ([2, 3, 1, 2], [True, True, False, False]),  # shorter than the state
                                       ([5], [True])])
def test_short_sequences(lens: list[int], init: list[bool]) -> None:
    run_both(lens, init, 40, torch.float32, torch.float32)


def test_verify_chunks_only() -> None:
    run_both([4, 1, 3, 2], [True] * 4, 72, torch.float32, torch.float32, verify=[True] * 4)


def test_chunked_prefill_equals_one_shot() -> None:
    """A 200-token prompt in chunks [64, 1, 70, 65], continuing from the pool, gives the one-shot result."""
    gen = torch.Generator().manual_seed(3)
    D = 40
    x = torch.randn(200, D, generator=gen).to(DEVICE)
    w = torch.randn(D, K, generator=gen).to(DEVICE)
    slot = torch.tensor([2], device=DEVICE)
    one_pool, pool = torch.zeros(S, K - 1, D, device=DEVICE), torch.zeros(S, K - 1, D, device=DEVICE)
    with dispatch.force_triton():
        one = conv1d.causal_conv1d_varlen(x, w, one_pool, slot, [200], [False])
        parts, s = [], 0
        for i, n in enumerate([64, 1, 70, 65]):
            parts.append(conv1d.causal_conv1d_varlen(x[s:s + n], w, pool, slot, [n], [i > 0]))
            s += n
    assert torch.allclose(torch.cat(parts), one, atol=1e-6)
    assert torch.equal(pool, one_pool)


def test_fresh_sequence_ignores_its_slot() -> None:
    """has_initial_state=False reads zeros, whatever (even NaN) a freed slot still holds."""
    gen = torch.Generator().manual_seed(4)
    D = 40
    x = torch.randn(5, D, generator=gen).to(DEVICE)
    w = torch.randn(D, K, generator=gen).to(DEVICE)
    slots = torch.tensor([1, 3], device=DEVICE)
    pool = torch.full((S, K - 1, D), float("nan"), device=DEVICE)
    with dispatch.force_triton():
        y = conv1d.causal_conv1d_varlen(x, w, pool, slots, [1, 4], [False, False])
    clean = torch.zeros(S, K - 1, D, device=DEVICE)
    want = reference.causal_conv1d_varlen(x, w, clean, slots, [1, 4], [False, False])
    assert torch.allclose(y, want, atol=1e-6)
    assert torch.equal(pool[slots], clean[slots])
