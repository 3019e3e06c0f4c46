"""bench/kernel_bench.py's plumbing, on CPU through the Triton interpreter at --small shapes: rows are measured and
written to --out as they come, a failing case is recorded (op, shape, traceback) while the others still run and
the exit status says so, a spent time budget skips the rest, an absent fla is a skip, and missing values print
as "-". The GPU figures themselves come from running the script on a GPU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("the CPU plumbing check; on a GPU run bench/kernel_bench.py itself", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels
pytest.importorskip("triton", reason="triton is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench.* (not installed)
from bench import kernel_bench as bk  # noqa: E402
from bench.kernel_suite.fla import fla_decode_row, fla_prefill_row  # noqa: E402
from bench.kernel_suite.measure import Row, measure  # noqa: E402
from bench.kernel_suite.norms import norm_cases  # noqa: E402
from bench.kernel_suite.report import row_line  # noqa: E402
from bench.kernel_suite.runner import BUILDERS  # noqa: E402

SMALL_ARGS = ["--device", "cpu", "--small", "--batch-sizes", "1", "--peak-gbps", "100"]


def test_rows_written_as_they_come(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    assert bk.main(SMALL_ARGS + ["--ops", "norms,fla", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["finished"] and doc["running"] is None and not doc["errors"]
    shapes = {(r["op"], r["shape"]) for r in doc["rows"]}
    assert ("rms_norm", "[1, 256]") in shapes and ("gated_rms_norm", "[70, 4, 32]") in shapes  # batch + prefill
    assert all(r["rel_err"] < 2e-2 and r["triton_us"] > 0 for r in doc["rows"])
    assert [s["op"] for s in doc["skipped"]] == ["fla"]  # not installed here, or CPU: a skip, not an error


def test_a_failing_case_is_recorded_and_the_rest_run(tmp_path: Path, monkeypatch) -> None:
    def broken(b):
        def boom():
            raise RuntimeError("kernel exploded")
        yield "broken_op", "[1]", boom
        yield from norm_cases(b)

    def broken_setup(b):
        raise ValueError("no weights")
        yield  # a generator

    monkeypatch.setitem(BUILDERS, "norms", broken)
    monkeypatch.setitem(BUILDERS, "conv", broken_setup)
    out = tmp_path / "k.json"
    assert bk.main(SMALL_ARGS + ["--ops", "conv,norms", "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    errors = {(e["op"], e["shape"]): e["error"] for e in doc["errors"]}
    assert "kernel exploded" in errors[("broken_op", "[1]")] and "no weights" in errors[("conv", "(setup)")]
    assert len(doc["rows"]) == 8 and doc["finished"]


def test_time_budget_skips_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    assert bk.main(SMALL_ARGS + ["--ops", "norms,conv", "--time-budget-s", "1e-9", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert not doc["rows"] and [(s["op"], s["shape"]) for s in doc["skipped"]] == [("norms", "(rest)"), ("conv", "*")]


def test_missing_values_print_as_dash() -> None:
    line = row_line(Row("op", "shape", 10.0, None, 100, 1.0, 5.0, None, "note"))
    assert line.split()[2:8] == ["10.0", "-", "-", "1", "5%", "-"]


def test_reference_caps() -> None:
    """Above --max-reference-tokens the reference is not timed; above --max-check-tokens not run."""
    calls = []
    b = bk.make_bench(bk.parse_args(SMALL_ARGS + ["--max-reference-tokens", "4", "--max-check-tokens", "8"]))
    b.peak_gbps = 1.0
    fast, ref = (lambda: torch.ones(3)), (lambda: calls.append(1) or torch.ones(3))
    r = measure(b, "op", "s", fast, ref, 1, tokens=4)
    assert r.reference_us is not None and r.rel_err == 0.0
    n = len(calls)
    r = measure(b, "op", "s", fast, ref, 1, tokens=8)
    assert r.reference_us is None and r.rel_err == 0.0 and len(calls) == n + 1
    r = measure(b, "op", "s", fast, ref, 1, tokens=9)
    assert r.reference_us is None and r.rel_err is None and len(calls) == n + 1


def fake_fla(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel):
    """FLA's documented semantics, written out token by token in fp64 (q, k [N, T, Hk, d]; v [N, T, Hv, d];
    value head h reads key head h // (Hv / Hk); states [N, Hv, dk, dv]): stands in for FLA on CPU, where its
    kernels cannot run, to check the comparison's plumbing (layouts, head mapping, states)."""
    assert use_qk_l2norm_in_kernel and output_final_state
    N, T, Hk, d = q.shape
    Hv = v.shape[2]
    q, k = (torch.nn.functional.normalize(x.double(), dim=-1, eps=0).repeat_interleave(Hv // Hk, dim=2)
            for x in (q, k))
    S = torch.zeros(N, Hv, d, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state.double()
    out = torch.empty(v.shape, dtype=torch.float64)
    for t in range(T):
        S = S * g[:, t].double().exp()[..., None, None]
        u = (v[:, t].double() - torch.einsum("nhk,nhkv->nhv", k[:, t], S)) * beta[:, t].double()[..., None]
        S = S + torch.einsum("nhk,nhv->nhkv", k[:, t], u)
        out[:, t] = torch.einsum("nhk,nhkv->nhv", q[:, t] * scale, S)
    return out.to(v.dtype), S.float()


def test_fla_comparison_plumbing() -> None:
    """Our kernel (interpreted) against the stand-in, through the bench's own prefill and decode rows."""
    from qnext.kernels.dispatch import force_triton
    b = bk.make_bench(bk.parse_args(SMALL_ARGS))
    b.peak_gbps = 1.0
    with force_triton():
        prefill = fla_prefill_row(b, b.shapes.prefill_mid, fake_fla, "fake")
        decode = fla_decode_row(b, 3, fake_fla, "fake")
    assert prefill.rel_err < 1e-2 and prefill.reference_us > 0  # bf16 outputs
    assert float(prefill.extra.split("final state rel_err ")[1].split(";")[0]) < 1e-5
    assert decode.rel_err < 1e-2 and float(decode.extra.split("new state rel_err ")[1].split(";")[0]) < 1e-5
