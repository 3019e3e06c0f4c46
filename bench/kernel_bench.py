"""Triton kernels vs their torch references at Qwen3-Next-80B-A3B's shapes, on a CUDA device.

For each case: median time (`triton.testing.do_bench`) of the Triton path and of the torch reference, the bytes
the op must move at least (read inputs and weights once, write outputs once), the bandwidth that implies, and
the fraction of the memory-bandwidth bound reached (bound = bytes / the device's copy bandwidth, measured here
with a large device-to-device copy unless --peak-gbps is given). GEMMs also show TFLOP/s, the time of a plain
bf16 matmul of the same shape and of cuBLAS's FP8 GEMM (`torch._scaled_mm`, per-tensor, row-wise and, where
this torch has it, block-wise scaled). The rel_err column compares the Triton output with the reference's.
The gated delta rule is also compared, in the same run, with flash-linear-attention (`fla`, when importable)
and, at 8K tokens, with published per-layer figures.

    python bench/kernel_bench.py --out kernels.json            # every op; about a minute or two on one GPU
    python bench/kernel_bench.py --ops fp8 --batch-sizes 1,256
    python bench/kernel_bench.py --quick --time-budget-s 60     # the key figures first, then stop
    python bench/kernel_bench.py --device cpu --small           # plumbing check: Triton interpreter, tiny shapes

Built to run once, unattended, under a hard timeout on a GPU where nothing has run before: each case runs on
its own (a failure is recorded with its traceback and the run goes on; exit status 1 at the end), every row is
printed as it is measured and --out is rewritten after each, so a run killed part-way leaves all it measured
and names the case it was in. The references are slow at long sequences: above --max-reference-tokens they
are not timed, above --max-check-tokens not run at all (missing values print as "-").

Shapes (docs/model.md §1, §4-§9): hidden 2048; FP8 linears in_proj_qkvz [12288, 2048], q_proj [8192, 2048],
out_proj/o_proj [2048, 4096], shared-expert up [512, 2048] and down [2048, 512]; norms over hidden 2048
(optionally with the residual add), q/k norm (16 heads x 256) and the gated norm (32 value heads x 128); conv
over conv_dim 8192, kernel 4; gated delta rule with 16 key / 32 value heads of 128, fp32 states; paged attention
with 16 query / 2 KV heads of 256 over 16-token blocks; the router and routed MoE with 512 experts, top-10,
moe_intermediate 512 (bf16 and FP8 weights). Decode batches of 1/64/256 tokens (conv, gated delta rule,
attention: that many sequences of one token; attention over a 4096-token context, and batch 1 over 32768),
speculative-verify batches of 3-token chunks (gated delta rule, up to 64 sequences), a 4096-token prefill
(also the GEMMs', norms' and MoE's large batch), 8192 for the gated delta rule (the published comparison) and
32768 for the gated delta rule and attention.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

from bench.kernel_suite.measure import MODEL, SMALL, Bench, copy_gbps  # noqa: E402
from bench.kernel_suite.report import HEAD, Report  # noqa: E402
from bench.kernel_suite.runner import BUILDERS, run_ops  # noqa: E402

DEFAULT_OPS = "gdr,fp8,attention,moe,fla,conv,norms"  # most wanted first: a run cut short keeps those


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=DEFAULT_OPS, help=f"comma list, run in this order; default {DEFAULT_OPS}")
    p.add_argument("--batch-sizes", default=None,
                   help=f"decode batches / token counts; default {MODEL.batch_sizes} ({SMALL.batch_sizes} with "
                        "--small); the token-count ops (fp8, norms, moe) also run at the prefill size")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth bound; default: measured copy")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here (after every case)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: the Triton kernels through the interpreter (TRITON_INTERPRET=1); use with --small")
    p.add_argument("--small", action="store_true", help="shrink every dimension (a plumbing check, not a benchmark)")
    p.add_argument("--quick", action="store_true",
                   help="batch sizes 1,256, no 32K cases, no prefill-size GEMM/norm/MoE rows, references not timed, "
                        "warmup 5 / rep 20 ms")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup (default 10, --quick 5)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench measuring time (default 50, --quick 20)")
    p.add_argument("--max-reference-tokens", type=int, default=None,
                   help="time the torch reference only up to this many tokens (default 4096, --quick 0)")
    p.add_argument("--max-check-tokens", type=int, default=32768,
                   help="run the reference once for rel_err only up to this many tokens (default 32768)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no case after this many seconds; the rest are recorded as skipped (0: no limit)")
    p.add_argument("--fla-path", default=None, help="a directory (e.g. an unpacked fla wheel) put first on sys.path")
    return p.parse_args(argv)


def make_bench(args: argparse.Namespace) -> Bench:
    shapes = SMALL if args.small else MODEL
    sizes = args.batch_sizes or ("1,256" if args.quick and not args.small else shapes.batch_sizes)
    return Bench(device=args.device, shapes=shapes, batch_sizes=[int(x) for x in sizes.split(",")], peak_gbps=0.0,
                 warmup_ms=args.warmup_ms or (5.0 if args.quick else 10.0),
                 rep_ms=args.rep_ms or (20.0 if args.quick else 50.0),
                 max_reference_tokens=(args.max_reference_tokens if args.max_reference_tokens is not None
                                       else 0 if args.quick else 4096),
                 max_check_tokens=args.max_check_tokens, long=not args.quick, prefill_batches=not args.quick)


def check_args(args: argparse.Namespace) -> None:
    unknown = [op for op in args.ops.split(",") if op.strip() not in BUILDERS]
    if unknown:
        sys.exit(f"unknown op(s) {unknown}: choose from {', '.join(BUILDERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/kernel_bench.py times the Triton kernels on a GPU: no CUDA device is visible here, nothing to "
                 "measure. (--device cpu --small runs every case through the Triton interpreter, to check the "
                 "plumbing; tests/test_triton_*.py check the kernels.)")


def run_header(args: argparse.Namespace, b: Bench) -> dict[str, object]:
    """The JSON's header (device, versions, settings), printed with the table's head."""
    name = torch.cuda.get_device_name() if b.cuda else "cpu (Triton interpreter)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not importable: {e}"
    header = {"device": name, "torch": torch.__version__, "triton": triton_version, "peak_gbps": b.peak_gbps,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "shapes": "small" if args.small else "model"}
    print(f"{name}  torch {torch.__version__}  triton {triton_version}  bandwidth bound {b.peak_gbps:.0f} GB/s"
          f"{' (given)' if args.peak_gbps else ' (measured copy)'}; do_bench warmup {b.warmup_ms:g} / rep "
          f"{b.rep_ms:g} ms; references timed up to {b.max_reference_tokens} tokens, checked up to "
          f"{b.max_check_tokens}\n", flush=True)
    print(HEAD)
    print("-" * len(HEAD), flush=True)
    return header


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (the kernels import it lazily)
    if args.fla_path:
        sys.path.insert(0, args.fla_path)
    torch.manual_seed(0)
    b = make_bench(args)
    b.peak_gbps = args.peak_gbps or copy_gbps(b)
    report = Report(args.out, run_header(args, b))
    deadline = time.monotonic() + args.time_budget_s if args.time_budget_s > 0 else None
    interrupted = run_ops([op.strip() for op in args.ops.split(",")], b, report, deadline)
    report.write()
    report.table()
    if interrupted:
        print(interrupted)
    return 1 if report.errors or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
