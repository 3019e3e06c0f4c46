"""kernels/cpu/argmax.py: the C row argmax of 16-bit logits against torch.argmax (first maximum, NaN the maximum,
+0 == -0), on random rows, ties, special values, row ends that are not whole vectors, and strided rows."""

from __future__ import annotations

import pytest
import torch

from qnext.kernels.cpu import argmax as argmax_cpu
from qnext.worker.sampler import row_argmax

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")
DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 31, 32, 33, 1000, 151936])
def test_random_rows_match_torch(dtype, cols):
    g = torch.Generator().manual_seed(cols)
    x = (torch.randn(5, cols, generator=g) * 4).to(dtype)
    x[1] = x[1].round()  # many ties: the first maximum wins
    assert torch.equal(argmax_cpu.row_argmax(x), x.argmax(dim=-1))
    wide = torch.randn(3, cols + 7, generator=g).to(dtype)[:, 3:cols + 3]  # rows strided
    assert torch.equal(argmax_cpu.row_argmax(wide), wide.argmax(dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_match_torch(dtype):
    inf, nan = float("inf"), float("nan")
    rows = [[1.0, nan, 3.0, nan], [-0.0, 0.0, -1.0, -2.0], [-inf] * 4, [2.0, 5.0, 5.0, inf], [-3.0, -2.0, -2.0, -9.0],
            [inf, inf, -inf, 1.0], [-nan, 1.0, 2.0, 3.0], [-5.0, -0.0, 0.0, -0.0], [1e-40, 0.0, -1e-40, 0.0]]
    x = torch.tensor(rows).to(dtype)
    padded = torch.cat([torch.full((len(rows), 40), -inf), x], dim=1).to(dtype)  # the special values past a vector
    for t in (x, padded):
        assert argmax_cpu.row_argmax(t).tolist() == t.argmax(dim=-1).tolist()


def test_the_sampler_uses_it_where_it_runs(monkeypatch):
    x = torch.randn(4, 4096).bfloat16()
    assert argmax_cpu.runs(x) and not argmax_cpu.runs(x.float()) and not argmax_cpu.runs(x[:, ::2])
    calls = []
    monkeypatch.setattr(argmax_cpu, "row_argmax", lambda t: calls.append(t) or t.argmax(dim=-1))
    row_argmax(x)
    assert len(calls) == 1
    monkeypatch.setenv("QNEXT_KERNELS", "reference")
    assert not argmax_cpu.runs(x)
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))


def test_rows_split_over_threads_give_torchs_answer(monkeypatch):
    """Rows split over 1 / 2 / 3 OpenMP threads (and more threads than rows): every row still torch's argmax."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(7, 5000, generator=g).bfloat16()
    x[3, 17] = x[3, 4000] = 50.0  # a tie: the first
    for threads in (1, 2, 3, 16):
        monkeypatch.setattr(argmax_cpu.cpu, "openmp_threads", lambda n=threads: n)
        assert torch.equal(argmax_cpu.row_argmax(x), x.argmax(dim=-1))
