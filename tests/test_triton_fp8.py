"""Triton FP8 quantisation and block-scaled GEMM vs the torch references: M from 1 to 129, K and N off the
128 grid, NaN-poisoned outputs. On a machine without CUDA the kernels run on CPU through the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels below
triton = pytest.importorskip("triton", reason="triton is not installed")

from conftest import require_triton  # noqa: E402

from qnext.kernels import dispatch, fp8  # noqa: E402
from qnext.kernels.fp8 import reference  # noqa: E402
from qnext.kernels.fp8.reference import FP8_DTYPE  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def triton_runs():
    require_triton(DEVICE)  # a skip only where Triton cannot run at all; an error of our kernels fails its test


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def activations(M: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of mixed magnitude (so groups hit e4m3's subnormals), one all-zero group, outliers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * torch.logspace(-3, 2, M)[:, None]
    x[0, :min(K, 128)] = 0.0
    x[-1, K // 2] = 1000.0
    return x.to(dtype).to(DEVICE)


def nan_fp8(*shape: int) -> torch.Tensor:
    return torch.full(shape, 0x7F, dtype=torch.uint8, device=DEVICE).view(FP8_DTYPE)  # 0x7f: e4m3fn NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K", [(1, 128), (3, 200), (129, 300), (9, 2048), (5, 64)])
def test_per_token_group_quant_bitwise(M: int, K: int, dtype: torch.dtype) -> None:
    from qnext.kernels.fp8.triton_quant import per_token_group_quant_fwd
    x = activations(M, K, dtype)
    G = -(-K // 128)
    out = (nan_fp8(M, K), torch.full((M, G), float("nan"), device=DEVICE))
    q, s = per_token_group_quant_fwd(x, 128, out=out)
    q_ref, s_ref = reference.per_token_group_quant(x, 128)
    assert q is out[0] and s is out[1]
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))  # every element written, each exact


def test_per_token_group_quant_public_and_strided() -> None:
    x = activations(4, 384, torch.bfloat16)[:, :300]  # row stride 384
    with dispatch.force_triton():
        q, s = fp8.per_token_group_quant(x)
    q_ref, s_ref = reference.per_token_group_quant(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def weights(N: int, K: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # per-block magnitudes differ, so a wrong scale index shows
    w = torch.randn(N, K, generator=gen) * (1 + torch.arange(N)[:, None] // 128) * 0.02
    q, s = reference.quantize_weight_block(w)
    return q.to(DEVICE), s.to(DEVICE)


@pytest.mark.parametrize("M", [1, 3, 17, 129])
@pytest.mark.parametrize("N,K", [(300, 200), (256, 384), (130, 100)])
def test_fp8_block_gemm_fp32(M: int, N: int, K: int) -> None:
    from qnext.kernels.fp8.triton_gemm import fp8_block_gemm_fwd
    x = activations(M, K, torch.float32)
    w, ws = weights(N, K)
    xq, xs = reference.per_token_group_quant(x)
    out = torch.full((M, N), float("nan"), device=DEVICE)
    y = fp8_block_gemm_fwd(xq, xs, w, ws, out_dtype=torch.float32, out=out)
    assert y is out and torch.isfinite(y).all()
    # The reference's fp32 sum of dequantised products: the same sum in another order (the interpreter) or with
    # Hopper's fp8 MMA, which keeps ~14 bits while summing each 128-wide block (the GPU).
    assert rel_err(y, reference.fp8_block_linear(x, w, ws)) < (1e-5 if DEVICE == "cpu" else 1e-3)


@pytest.mark.parametrize("M", [1, 33])  # 2 * 33 rows: the M > 64 tiles
def test_fp8_block_linear_bf16_public(M: int) -> None:
    """The public entry point: x [..., K] bf16, quantised by the Triton kernel, bf16 out."""
    K, N = 200, 300
    x = activations(M * 2, K, torch.bfloat16).view(2, M, K)
    w, ws = weights(N, K)
    with dispatch.force_triton():
        y = fp8.fp8_block_linear(x, w, ws)
    assert y.shape == (2, M, N) and y.dtype == torch.bfloat16
    assert rel_err(y, reference.fp8_block_linear(x, w, ws)) < 1e-2
