"""The kernel benchmark's output: each row printed as it is measured, the table at the end, and the JSON file
rewritten after every case (and before it, naming it)."""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from bench.bench_common import write_json
from bench.kernel_suite.measure import Row, squeeze


def short_traceback(e: BaseException, limit: int = 4, max_chars: int = 3000) -> str:
    """The last frames and the message; a long message (a Triton compile error's IR dump) keeps its ends."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-limit))
    return text if len(text) <= max_chars else text[:max_chars // 2] + "\n[...]\n" + text[-max_chars // 2:]


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    """A value, or "-" where there is none (not measured, skipped)."""
    return "-" if x is None or x != x else format(x, spec) + suffix


HEAD = (f"{'op':<26} {'shape':<24} {'triton us':>10} {'ref us':>10} {'speedup':>8} {'GB/s':>8} "
        f"{'% bw bound':>10} {'rel_err':>9}  notes")


def row_line(r: Row) -> str:
    speedup = r.reference_us / r.triton_us if r.reference_us and r.triton_us else None
    return (f"{r.op:<26} {r.shape:<24} {fmt(r.triton_us, '.1f'):>10} {fmt(r.reference_us, '.1f'):>10} "
            f"{fmt(speedup, '.1f', 'x'):>8} {fmt(r.gbps, '.0f'):>8} {fmt(r.bound_pct, '.0f', '%'):>10} "
            f"{fmt(r.rel_err, '.1e'):>9}  {r.extra}")


class Report:
    """Rows, errors and skips so far. Each row is printed when measured, and --out rewritten after every case
    (and before it, naming it as `running`), so that a run killed by its timeout leaves all it measured and
    says where it stopped."""

    def __init__(self, out: Path | None, header: dict[str, object]):
        self.out, self.header = out, header
        self.rows: list[Row] = []
        self.errors: list[dict[str, str]] = []
        self.skipped: list[dict[str, str]] = []
        self.running: str | None = None
        self.op_seconds: dict[str, float] = {}  # wall time of each op, compilation included: to plan the next run
        self.finished = False
        self.t0 = time.monotonic()

    def write(self) -> None:
        if self.out is None:
            return
        doc = dict(self.header, rows=[asdict(r) for r in self.rows], errors=self.errors, skipped=self.skipped,
                   running=self.running, op_seconds=self.op_seconds, finished=self.finished,
                   elapsed_s=round(time.monotonic() - self.t0, 1))
        write_json(self.out, doc)  # a kill mid-write leaves the previous complete file

    def start(self, op: str, shape: str) -> None:
        self.running = f"{op} {shape}"
        self.write()

    def row(self, r: Row) -> None:
        self.rows.append(r)
        print(row_line(r), flush=True)
        self.running = None
        self.write()

    def error(self, op: str, shape: str, e: BaseException) -> None:
        self.errors.append({"op": op, "shape": shape, "error": short_traceback(e)})
        print(f"{op:<26} {shape:<24} ERROR {type(e).__name__}: {squeeze(str(e))}", flush=True)
        self.running = None
        self.write()

    def skip(self, op: str, shape: str, reason: str) -> None:
        self.skipped.append({"op": op, "shape": shape, "reason": reason})
        print(f"{op:<26} {shape:<24} skipped: {reason}", flush=True)
        self.running = None
        self.write()

    def table(self) -> None:
        print("\n" + HEAD)
        print("-" * len(HEAD))
        for r in self.rows:
            print(row_line(r))
        for e in self.errors:
            print(f"ERROR {e['op']} {e['shape']}: {e['error'].strip().splitlines()[-1][:300]}")
        for s in self.skipped:
            print(f"skipped {s['op']} {s['shape']}: {s['reason']}")
        sys.stdout.flush()
