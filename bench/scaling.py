"""Throughput and p99 inter-token latency vs concurrency, through a local server, measured with qnext-bench's
library (qnext_rpc.loadtest) in one run.

    python bench/scaling.py [--model DIR] [--concurrency 1,2,4,8,16,32,64] [--input-len 32] [--output-len 16]
    python bench/scaling.py --out scaling/        # + result.json, latency_cdf.png, sweep.png

Starts qnext-serve on the embedded default (or --model) with --max-num-seqs at the largest concurrency, then
holds each concurrency for max(4, 2 x concurrency) requests (synthetic prompts, greedy, ignore_eos, so every
request generates exactly --output-len tokens). Prints per level: requests/s, output tokens/s and its ratio to
concurrency 1 (ideal: the concurrency itself while the step time stays flat), p99 ITL and its ratio to
concurrency 1, p99 TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.provenance import git_state  # noqa: E402
from qnext.rpc.loadtest.arrival import Load  # noqa: E402
from qnext.rpc.loadtest.report import plot_cdfs, plot_sweep, write_json  # noqa: E402
from qnext.rpc.loadtest.runner import model_info, run_point  # noqa: E402
from qnext.rpc.loadtest.stats import summarize  # noqa: E402
from qnext.rpc.loadtest.workload import Length, Workload  # noqa: E402
from test_service_support import ServerProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="directory for result.json and the plots")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.model is None:
        from qnext.worker.tiny import default_checkpoint
        args.model = str(default_checkpoint())
    server = ServerProcess(Path(args.model), "--device", args.device, "--max-num-seqs", str(max(levels)))
    try:
        info = asyncio.run(model_info(server.target))
        assert info is not None, "the server did not answer GetModelInfo"
        workload = Workload(Length(args.output_len), Length(args.input_len), vocab_size=info.vocab_size,
                            excluded_ids=frozenset(info.eos_token_ids))
        greedy = {"temperature": 0.0}
        requests = workload.requests()  # one stream: no level repeats another's prompts (prefix cache hits)
        asyncio.run(run_point(server.target, Load("concurrency", 1), requests, num_requests=1,
                              duration_s=None, ignore_eos=True, extra=greedy, progress=False))  # warm-up
        points = [asyncio.run(run_point(server.target, Load("concurrency", c), requests,
                                        num_requests=max(4, 2 * c), duration_s=None, ignore_eos=True, extra=greedy))
                  for c in levels]
    finally:
        server.stop()
    summaries = [summarize(p) for p in points]
    base = summaries[0]
    print(f"{args.input_len}-token prompts, {args.output_len} new tokens, greedy, ignore_eos; {info.device}")
    print(f"{'conc':>5} {'requests':>8} {'errors':>6} {'req/s':>7} {'out tok/s':>10} {'x c=1':>6} {'p99 ITL ms':>11} "
          f"{'x c=1':>6} {'p99 TTFT ms':>12}")
    for s in summaries:
        print(f"{int(s.value):>5} {s.num_requests:>8} {s.num_requests - s.num_ok:>6} {s.request_throughput:7.2f} "
              f"{s.output_throughput:10.1f} {s.output_throughput / base.output_throughput:6.2f} {s.itl.p99:11.1f} "
              f"{s.itl.p99 / base.itl.p99:6.2f} {s.ttft.p99:12.1f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "result.json", {**vars(args), "out": str(args.out), **git_state()}, points, summaries)
        plot_cdfs(args.out / "latency_cdf.png", points)
        plot_sweep(args.out / "sweep.png", summaries)
        print(f"results in {args.out}/")


if __name__ == "__main__":
    main()
