"""Running the kernel cases: every case of every op on its own (a failure is recorded with its traceback and the
run goes on), within the time budget, until SIGTERM or a lost CUDA context stops the run."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import torch

from bench.kernel_suite.attention import attention_cases
from bench.kernel_suite.conv import conv_cases
from bench.kernel_suite.fla import fla_cases
from bench.kernel_suite.fp8 import fp8_cases
from bench.kernel_suite.gdr import gdr_cases
from bench.kernel_suite.measure import Bench, Case, Skip, squeeze
from bench.kernel_suite.moe import moe_cases
from bench.kernel_suite.norms import norm_cases
from bench.kernel_suite.report import Report

BUILDERS: dict[str, Callable[[Bench], Iterator[Case]]] = {
    "gdr": gdr_cases, "fla": fla_cases, "fp8": fp8_cases, "attention": attention_cases, "moe": moe_cases,
    "conv": conv_cases, "norms": norm_cases}


class Interrupted(BaseException):
    """SIGTERM (the run's timeout): not an Exception, so that no per-case handler swallows it."""


def on_sigterm(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


def device_alive(b: Bench) -> str | None:
    """None, or why the CUDA context is unusable (an illegal access poisons it: every later case would fail)."""
    if not b.cuda:
        return None
    try:
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"CUDA context lost: {squeeze(str(e))}"


def run_op(name: str, b: Bench, report: Report, deadline: float | None) -> bool:
    """Every case of one op, each on its own. False when the run must stop (time budget spent, device lost)."""
    cases = BUILDERS[name](b)
    while True:
        if deadline is not None and time.monotonic() > deadline:
            report.skip(name, "(rest)", "time budget spent")
            return False
        try:
            op, shape, run = next(cases)
        except StopIteration:
            return True
        except Exception as e:  # the op's shared set-up failed: its remaining cases cannot run
            report.error(name, "(setup)", e)
            return device_alive(b) is None
        report.start(op, shape)
        try:
            r = run()
        except Skip as e:
            report.skip(op, shape, str(e))
        except Exception as e:
            report.error(op, shape, e)
        else:
            report.row(r)
            continue
        lost = device_alive(b)  # after the except block, which held the failed case's tensors through `e`
        if lost:
            report.skip("*", "(rest)", lost)
            return False
        if b.cuda:
            torch.cuda.empty_cache()  # an out-of-memory case leaves the next ones room


def run_ops(ops: list[str], b: Bench, report: Report, deadline: float | None) -> str | None:
    """Every op in order, the Triton kernels forced; after a stop, the ops not started are recorded as skipped.
    Returns None, or how the run was interrupted (SIGTERM: the run's timeout; Ctrl-C)."""
    from qnext.kernels.dispatch import force_triton  # after TRITON_INTERPRET is set, on CPU
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = None
    try:
        with force_triton(), torch.inference_mode():
            for i, op in enumerate(ops):
                t_op = time.monotonic()
                go_on = run_op(op, b, report, deadline)
                report.op_seconds[op] = round(time.monotonic() - t_op, 1)
                print(f"[{op}: {report.op_seconds[op]:.1f} s, {time.monotonic() - report.t0:.0f} s in all]", flush=True)
                if not go_on:
                    for rest in ops[i + 1:]:
                        report.skip(rest, "*", "not started: the run stopped (see above)")
                    break
                if b.cuda:
                    torch.cuda.empty_cache()
        report.finished = True
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted = f"interrupted ({e or type(e).__name__}) during {report.running}"
        report.skipped.append({"op": "*", "shape": "(rest)", "reason": interrupted})
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return interrupted
