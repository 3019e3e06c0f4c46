"""Triton RMSNorms vs the torch references: odd row counts and widths, strided inputs, NaN-poisoned outputs.
On a machine without CUDA the kernels run on CPU through the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels below
triton = pytest.importorskip("triton", reason="triton is not installed")

from conftest import require_triton  # noqa: E402

from qnext.kernels import dispatch, norms  # noqa: E402
from qnext.kernels.norms import reference  # noqa: E402

EPS = 1e-6
# bf16: a few roundings of 2^-8, and the interpreter rounds fp32 -> bf16 towards zero (seen: 0.009 for the gated
# norm's three roundings on CPU), the GPU to nearest.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def triton_runs():
    require_triton(DEVICE)  # a skip only where Triton cannot run at all; an error of our kernels fails its test


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,D", [(1, 2048), (3, 200), (129, 256), (70, 72)])
def test_rms_norm_zero_centred(rows: int, D: int, dtype: torch.dtype) -> None:
    from qnext.kernels.norms.triton_norms import rms_norm_fwd
    x, w = randn(rows, D, dtype=dtype) * 3, randn(D, seed=1) * 0.1
    out = torch.full_like(x, float("nan"))
    y, h = rms_norm_fwd(x, w, EPS, out=out)
    assert y is out and h is None
    assert torch.isfinite(y).all()
    assert rel_err(y, reference.rms_norm_zero_centred(x, w, EPS)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_zero_centred(dtype: torch.dtype) -> None:
    from qnext.kernels.norms.triton_norms import rms_norm_fwd
    x, r, w = randn(129, 200, dtype=dtype), randn(129, 200, dtype=dtype, seed=2), randn(200, seed=1) * 0.1
    out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    y, h = rms_norm_fwd(x, w, EPS, residual=r, out=out, residual_out=res_out)
    want_h = x + r
    if dtype == torch.float32:
        assert torch.equal(h, want_h)
    else:  # the interpreter rounds fp32 -> bf16 towards zero, the GPU to nearest: one ulp apart at most
        assert torch.allclose(h.float(), want_h.float(), rtol=2 ** -7, atol=0)
    assert rel_err(y, reference.rms_norm_zero_centred(want_h, w, EPS)) < TOL[dtype]


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,D", [(1, 32, 128), (3, 5, 100), (65, 2, 48)])
def test_gated_rms_norm(T: int, H: int, D: int, dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    from qnext.kernels.norms.triton_norms import gated_rms_norm_fwd
    x, z = randn(T * H, D, dtype=dtype), randn(T * H, D, dtype=dtype, seed=3) * 2
    w = (1 + 0.1 * randn(D, seed=1)).to(w_dtype)
    out = torch.full_like(x, float("nan"))
    y = gated_rms_norm_fwd(x, z, w, EPS, out=out)
    assert y is out and torch.isfinite(y).all()
    assert rel_err(y, reference.gated_rms_norm(x, z, w, EPS)) < TOL[dtype]


def test_public_functions_take_strided_views() -> None:
    """The model hands over slices ([T, H, D] views of wider projections); the public functions accept them."""
    big = randn(7, 3, 300, dtype=torch.bfloat16)
    x, z = big[..., :128], big[..., 150:278]  # row stride 300, last dim contiguous
    w = randn(128, seed=1) * 0.1
    with dispatch.force_triton():
        y = norms.rms_norm_zero_centred(x, w, EPS)
        g = norms.gated_rms_norm(x, z, w + 1, EPS)
        n, h = norms.add_rms_norm_zero_centred(x, z, w, EPS)
    assert y.shape == g.shape == n.shape == h.shape == x.shape
    assert rel_err(y, reference.rms_norm_zero_centred(x, w, EPS)) < TOL[torch.bfloat16]
    assert rel_err(g, reference.gated_rms_norm(x, z, w + 1, EPS)) < TOL[torch.bfloat16]
    assert rel_err(n, reference.rms_norm_zero_centred(x + z, w, EPS)) < TOL[torch.bfloat16]


def test_dispatch_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.kernels_mode() == "auto" and not dispatch.use_triton(cpu)
    with dispatch.force_triton():
        assert dispatch.use_triton(cpu) and not dispatch.use_triton(cpu.double())
    assert not dispatch.use_triton(cpu)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")  # read at call time
    assert dispatch.kernels_mode() == "reference"
    if torch.cuda.is_available():
        assert not dispatch.use_triton(cpu.cuda())
    monkeypatch.setenv(dispatch.ENV_VAR, "trtion")
    with pytest.raises(ValueError, match="QNEXT_KERNELS"):
        dispatch.kernels_mode()
