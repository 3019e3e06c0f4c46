"""`qnext-bench`: drive a qnext.v1.Generation server and report latency and throughput.

    qnext-bench --target localhost:50051 --concurrency 1,4,16 --num-requests 64 --input-len 128 --output-len 64 \
        --ignore-eos --output-dir out/bench
    qnext-bench --target host:50051 --request-rate 2,4,8 --duration 60 --dataset prompts.jsonl --slo-ttft-ms 500
    qnext-bench --target host:50051 --api-key KEY --ssl-ca-certs ca.pem       # a server with --api-key and TLS

A comma list for --concurrency or --request-rate is a sweep: one load point per value (each with new prompts
of the same length distribution). Writes OUTPUT_DIR/result.json, latency_cdf.png and, for sweeps, sweep.png. Exit status: 0; 1 when a
load point had no successful request (its errors are in the summary); 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

from qnext.rpc import generate_cli
from qnext.rpc.loadtest.arrival import Load
from qnext.rpc.loadtest.report import format_summary, format_sweep, plot_cdfs, plot_sweep, write_json
from qnext.rpc.loadtest.runner import model_info, run_point
from qnext.rpc.loadtest.stats import summarize
from qnext.rpc.loadtest.workload import FALLBACK_VOCAB_SIZE, Length, Workload, load_dataset
from qnext.rpc.security import ClientSecurity, add_client_security_flags, client_security
from qnext.worker.cli_help import HelpFormatter


class UsageError(ValueError):
    """Bad command-line input; the message starts with the flag."""


def _list(flag: str, raw: str, kind: str) -> list[Load]:
    loads = []
    for item in raw.split(","):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"{flag}: not a number: {item!r}") from None
        try:
            loads.append(Load(kind, value))
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    return loads


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{flag}: must be > 0, got {value:g}")


def _length(flag: str, mean: int, ratio: float) -> Length:
    try:
        return Length(mean, ratio)
    except ValueError as e:
        which = f"{flag}-range" if "range" in str(e) else flag
        raise UsageError(f"{which}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnext-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--target", default="localhost:50051", help="HOST:PORT of the gRPC server")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="requests in flight; a comma list is a sweep (default: 1)")
    load.add_argument("--request-rate", help="Poisson arrivals per second (inf = all at once); a comma list is a "
                                             "sweep (default: off, --concurrency sets the load)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--num-requests", type=int, help="requests per load point (default: 100)")
    stop.add_argument("--duration", type=float, help="seconds per load point, then in-flight requests finish "
                                                    "(default: off, --num-requests ends a point)")
    a("--input-len", type=int, default=128, help="prompt tokens of synthetic prompts")
    a("--input-len-range", type=float, default=0.0, help="r: prompt lengths uniform in input-len * [1-r, 1+r]")
    a("--output-len", type=int, default=128, help="max_new_tokens of each request")
    a("--output-len-range", type=float, default=0.0, help="r: output lengths uniform in output-len * [1-r, 1+r]")
    a("--dataset", type=Path, help="JSONL prompts, {text|token_ids|chat, output_len?} per line "
                                   "(default: synthetic prompts, see --input-len)")
    a("--ignore-eos", action="store_true", help="generate exactly the requested lengths")
    a("--temperature", type=float, help="sampling temperature (default: the server's)")
    a("--num-speculative-tokens", type=int, help="MTP draft length per request (default: the server's)")
    a("--bypass-prefix-cache", action="store_true", help="requests neither use nor fill the server's prefix cache")
    a("--json-schema", metavar="FILE", help="every request's output constrained to this JSON schema "
                                            "(response_format; default: free)")
    a("--tools", metavar="FILE", help="tools for every request, a JSON list as qnext-generate's --tools; needs a "
                                      "--dataset of chat prompts (default: none)")
    a("--tool-choice", help="auto, none, required or a tool's name, with --tools (default: auto)")
    a("--slo-ttft-ms", type=float, help="goodput counts requests with TTFT at most this (default: no TTFT limit)")
    a("--slo-tpot-ms", type=float, help="goodput counts requests with TPOT at most this (default: no TPOT limit)")
    a("--timeout", type=float, help="per-request deadline in seconds, expired -> DEADLINE_EXCEEDED (default: none)")
    a("--seed", type=int, default=0, help="seeds prompts, lengths and arrival times")
    a("--output-dir", type=Path, default=Path("qnext-bench-results"), help="where result.json and plots go")
    a("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    a("--no-progress", action="store_true", help="no live progress line on stderr")
    add_client_security_flags(p)
    return p


def plan(args: argparse.Namespace) -> tuple[list[Load], dict[str, Any]]:
    """Check every flag (UsageError naming it) before anything is sent; returns the load points and how long
    each is held."""
    _length("--input-len", args.input_len, args.input_len_range)
    _length("--output-len", args.output_len, args.output_len_range)
    if args.dataset is not None and not args.dataset.is_file():
        raise UsageError(f"--dataset: no such file: {args.dataset}")
    loads = (_list("--request-rate", args.request_rate, "rate") if args.request_rate
             else _list("--concurrency", args.concurrency or "1", "concurrency"))
    if args.num_requests is not None and args.num_requests < 1:
        raise UsageError(f"--num-requests: must be >= 1, got {args.num_requests}")
    for flag, value in (("--duration", args.duration), ("--timeout", args.timeout),
                        ("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-tpot-ms", args.slo_tpot_ms)):
        _positive(flag, value)
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:  # fail now, not after the run
        raise UsageError("--no-plots: matplotlib is not installed (pip install 'qnext[bench]'), or pass --no-plots")
    if ":" not in args.target:
        raise UsageError(f"--target: expected HOST:PORT, got {args.target!r}")
    _security(args)
    agent_fields(args)
    stop = {"num_requests": None, "duration_s": args.duration} if args.duration else \
        {"num_requests": args.num_requests or 100, "duration_s": None}
    return loads, stop


def agent_fields(args: argparse.Namespace) -> dict[str, Any]:
    """response_format / tools / tool_choice for every request, from --json-schema / --tools / --tool-choice."""
    fields: dict[str, Any] = {}
    try:
        if args.json_schema:
            fields["response_format"] = ("json_schema", generate_cli.read_flag_file(args.json_schema, "--json-schema"))
        if args.tools:
            fields["tools"] = generate_cli.load_tools(args.tools)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.tool_choice:
        fields["tool_choice"] = args.tool_choice
    if (args.tools or args.tool_choice) and args.dataset is None:
        raise UsageError("--tools: needs a --dataset of chat prompts (synthetic prompts are token ids)")
    if args.ignore_eos and (args.json_schema or args.tool_choice not in (None, "auto", "none")):
        raise UsageError("--ignore-eos: a constrained output ends with EOS; drop --ignore-eos")
    return fields


def _security(args: argparse.Namespace) -> ClientSecurity:
    try:
        return client_security(args)
    except ValueError as e:  # a certificate without its key, an unreadable file: named by its flag
        raise UsageError(str(e)) from None


def build_workload(args: argparse.Namespace, info: Any | None) -> Workload:
    output_len = _length("--output-len", args.output_len, args.output_len_range)
    vocab = info.vocab_size if info is not None else FALLBACK_VOCAB_SIZE
    eos = frozenset(info.eos_token_ids) if info is not None else frozenset()
    if args.dataset is not None:
        try:
            rows = load_dataset(args.dataset)
        except (OSError, ValueError) as e:
            raise UsageError(f"--dataset: {e}") from None
        return Workload(output_len, dataset=rows, seed=args.seed)
    return Workload(output_len, _length("--input-len", args.input_len, args.input_len_range), vocab_size=vocab,
                    excluded_ids=eos, seed=args.seed)


async def run(args: argparse.Namespace) -> int:
    loads, stop = plan(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    security = _security(args)
    info = await model_info(args.target, security=security)
    if info is None:
        print(f"qnext-bench: {args.target} did not answer GetModelInfo; sending anyway, errors will be counted",
              file=sys.stderr)
    workload = build_workload(args, info)
    extra = {k: getattr(args, k) for k in ("temperature", "num_speculative_tokens") if getattr(args, k) is not None}
    extra.update(agent_fields(args))
    if args.bypass_prefix_cache:
        extra["bypass_prefix_cache"] = True
    requests = workload.requests()  # one stream across the points (see workload.py)
    points, summaries = [], []
    for i, load in enumerate(loads):
        point = await run_point(args.target, load, requests, ignore_eos=args.ignore_eos, extra=extra,
                                timeout=args.timeout, seed=args.seed + i, progress=not args.no_progress,
                                security=security, **stop)
        points.append(point)
        summaries.append(summarize(point, args.slo_ttft_ms, args.slo_tpot_ms))
        print(format_summary(summaries[-1]), flush=True)
    if len(summaries) > 1:
        print(format_sweep(summaries))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # result.json records the run's flags, but never the key itself
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
    config["api_key"] = "set" if security.api_key else None
    config["started_utc"] = started
    if info is not None:
        config["server"] = {"model_id": info.model_id, "dtype": info.dtype, "quantization": info.quantization,
                            "device": info.device, "max_num_seqs": info.max_num_seqs}
    write_json(args.output_dir / "result.json", config, points, summaries)
    if not args.no_plots:
        plot_cdfs(args.output_dir / "latency_cdf.png", points)
        if len(summaries) > 1:
            plot_sweep(args.output_dir / "sweep.png", summaries)
    print(f"results in {args.output_dir}/", file=sys.stderr)
    return 0 if all(s.num_ok for s in summaries) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except UsageError as e:
        print(f"qnext-bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
