"""kernels/cpu/norms.py: the C zero-centred RMSNorm (and residual add + norm) against a float64 computation of the
same formula and against the torch reference, on row widths around the 16-lane vectors and past the stack buffer,
strided rows, and the cases that must stay on torch."""

from __future__ import annotations

import pytest
import torch

from qnext.kernels import norms as norms_dispatch
from qnext.kernels.cpu import norms as cpu_norms
from qnext.kernels.norms import reference

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")
EPS = 1e-6
DIMS = [1, 15, 16, 17, 256, 2048, 2049, 4100]  # 2049+: the scratch rows come from malloc, not the stack


def exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The formula in float64, from the values x and w hold."""
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + w.double())


def inputs(rows: int, dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = (torch.randn(dim, generator=g) * 0.2).to(dtype)
    r = torch.randn(rows, dim, generator=g).to(dtype)
    return x, w, r


@pytest.mark.parametrize("dim", DIMS)
def test_fp32_within_an_ulp_or_two_of_the_exact_value(dim):
    x, w, r = inputs(7, dim, torch.float32, dim)
    y, none = cpu_norms.rms_norm_zero_centred(x, w, EPS)
    assert none is None and y.dtype == torch.float32 and y.shape == x.shape
    ref_err = (reference.rms_norm_zero_centred(x, w, EPS).double() - exact(x, w)).abs()
    err = (y.double() - exact(x, w)).abs()
    ulp = torch.finfo(torch.float32).eps * exact(x, w).abs().clamp_min(1e-30)
    assert (err <= 4 * ulp).all(), (err / ulp).max()  # four fp32 roundings in the formula
    assert err.max() <= ref_err.max() * 2 + 1e-30  # no worse than torch's own order of the sum of squares
    y2, h = cpu_norms.rms_norm_zero_centred(x, w, EPS, residual=r)
    assert torch.equal(h, x + r)
    assert ((y2.double() - exact(x + r, w)).abs() <= 4 * torch.finfo(torch.float32).eps
            * exact(x + r, w).abs().clamp_min(1e-30)).all()


@pytest.mark.parametrize("dim", DIMS)
def test_bf16_is_the_rounded_exact_value_and_matches_torch(dim):
    x, w, r = inputs(9, dim, torch.bfloat16, 100 + dim)
    for residual in (None, r):
        y, h = cpu_norms.rms_norm_zero_centred(x, w, EPS, residual)
        src = x if residual is None else x + r
        if residual is not None:
            assert torch.equal(h, x + r)  # the sum rounded to bf16, as torch's add rounds it
        want = exact(src, w)
        # one rounding of a value within fp32 error of the exact one: the nearest bf16 or, on a tie-close value,
        # its neighbour; never further
        step = (want.abs().float().bfloat16().double() * 2.0 ** -7).clamp_min(1e-38)
        assert ((y.double() - want).abs() <= step).all()
        torch_y = reference.rms_norm_zero_centred(src, w, EPS)
        assert (y != torch_y).float().mean() <= 0.002  # torch's other sum order flips a rounding now and then


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_its_batch(dtype):
    x, w, r = inputs(16, 256, dtype, 7)
    y, h = cpu_norms.rms_norm_zero_centred(x, w, EPS, r)
    for i in (0, 5, 15):
        yi, hi = cpu_norms.rms_norm_zero_centred(x[i:i + 1], w, EPS, r[i:i + 1])
        assert torch.equal(yi[0], y[i]) and torch.equal(hi[0], h[i])


def test_strided_rows_and_leading_dims():
    x, w, r = inputs(6, 96, torch.bfloat16, 3)
    wide = torch.cat([x, r], dim=1)[:, :96]  # rows at stride 192
    assert cpu_norms.runs(wide, w, r[:, :96])
    y, h = cpu_norms.rms_norm_zero_centred(wide, w, EPS, r)
    assert torch.equal(y, cpu_norms.rms_norm_zero_centred(x, w, EPS, r)[0]) and torch.equal(h, x + r)
    plain = cpu_norms.rms_norm_zero_centred(x, w, EPS)[0]
    assert torch.equal(cpu_norms.rms_norm_zero_centred(x.view(2, 3, 96), w, EPS)[0], plain.view(2, 3, 96))


def test_what_stays_on_torch(monkeypatch):
    x, w, r = inputs(4, 64, torch.bfloat16, 5)
    assert cpu_norms.runs(x, w) and cpu_norms.runs(x, w, r) and cpu_norms.runs(x.float(), w.float())
    assert not cpu_norms.runs(x, w.float())  # the weight in another dtype
    assert not cpu_norms.runs(x.double(), w.double())  # fp64: the reference's exactness runs
    assert not cpu_norms.runs(x.view(4, 2, 32).transpose(0, 1), w[:32])  # rows that are no [rows, D] view
    assert not cpu_norms.runs(x[:, ::2], w[:32])  # strided columns
    assert not cpu_norms.runs(x, w, r.float())
    monkeypatch.setenv("QNEXT_KERNELS", "reference")
    assert not cpu_norms.runs(x, w)


def test_the_dispatch_and_the_model_use_it(monkeypatch):
    from qnext.worker.model import RMSNorm
    calls = []
    real = cpu_norms.rms_norm_zero_centred
    monkeypatch.setattr(cpu_norms, "rms_norm_zero_centred",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, w, r = inputs(3, 32, torch.bfloat16, 11)
    norm = RMSNorm(32, EPS).to(torch.bfloat16)
    norm.weight.data.copy_(w)
    assert torch.equal(norm(x), real(x, w, EPS)[0])
    y, h = norms_dispatch.add_rms_norm_zero_centred(x, r, w, EPS)
    assert torch.equal(h, x + r) and len(calls) == 2
    monkeypatch.setenv("QNEXT_KERNELS", "reference")
    assert torch.equal(norm(x), reference.rms_norm_zero_centred(x, w, EPS)) and len(calls) == 2
