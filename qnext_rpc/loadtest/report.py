"""What a run leaves behind: result.json (config, per-point summary and per-request records), a printed
summary per point and a table for sweeps, latency_cdf.png, and sweep.png (throughput and p99 latency vs the
swept concurrency or rate) when more than one point ran. matplotlib is an optional extra (`qnext[bench]`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qnext.rpc.loadtest.runner import PointResult
from qnext.rpc.loadtest.stats import Distribution, Summary


def write_json(path: Path, config: dict[str, Any], points: list[PointResult], summaries: list[Summary]) -> None:
    doc = {"config": config,
           "points": [{"summary": s.to_dict(), "requests": [asdict(r) for r in p.records]}
                      for p, s in zip(points, summaries)]}
    path.write_text(json.dumps(doc, indent=1))


def _dist_line(name: str, d: Distribution | None) -> str:
    if d is None:
        return f"  {name:<5} -"
    return (f"  {name:<5} mean {d.mean:9.2f}  p50 {d.p50:9.2f}  p90 {d.p90:9.2f}  p99 {d.p99:9.2f}  "
            f"max {d.max:9.2f} ms")


def format_summary(s: Summary) -> str:
    errors = ", ".join(f"{code} {n}" for code, n in sorted(s.errors.items())) or "none"
    lines = [
        f"== {s.label}: {s.num_ok}/{s.num_requests} ok in {s.duration_s:.2f} s; errors: {errors}",
        f"  requests/s {s.request_throughput:.3f}   output tok/s {s.output_throughput:.2f}   "
        f"total tok/s {s.total_token_throughput:.2f}",
        f"  mean prompt {s.mean_prompt_tokens:.1f} tokens ({s.mean_cached_tokens:.1f} from the prefix cache), "
        f"mean output {s.mean_output_tokens:.1f} tokens; "
        f"streamed token count != Usage in {s.num_usage_mismatches} requests",
        *(f"  {code}: {msg}" for code, msg in sorted(s.error_examples.items())),
        _dist_line("TTFT", s.ttft), _dist_line("TPOT", s.tpot), _dist_line("ITL", s.itl), _dist_line("E2E", s.e2e),
    ]
    if s.goodput is not None:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in (("TTFT", s.slo_ttft_ms), ("TPOT", s.slo_tpot_ms)) if v)
        lines.append(f"  goodput ({slo}) {s.goodput:.3f} req/s = {100 * (s.goodput_fraction or 0):.1f}% of requests")
    return "\n".join(lines)


def format_sweep(summaries: list[Summary]) -> str:
    """One row per point, with throughput relative to the first point."""
    base = summaries[0].output_throughput or float("nan")
    p99 = lambda d: f"{d.p99:10.2f}" if d else f"{'-':>10}"  # noqa: E731
    rows = [f"{summaries[0].kind:>12} {'ok/sent':>9} {'req/s':>8} {'out tok/s':>10} {'x first':>8} "
            f"{'p99 TTFT':>10} {'p99 ITL':>10} {'p99 E2E':>10}"]
    for s in summaries:
        rows.append(f"{s.value:>12g} {f'{s.num_ok}/{s.num_requests}':>9} {s.request_throughput:8.3f} "
                    f"{s.output_throughput:10.2f} {s.output_throughput / base:8.2f} {p99(s.ttft)} {p99(s.itl)} "
                    f"{p99(s.e2e)}")
    return "\n".join(rows)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'qnext[bench]' (or pass --no-plots)") from None
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    return plt


def plot_cdfs(path: Path, points: list[PointResult]) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    metrics = [("TTFT", lambda r: [r.ttft_s] if r.ttft_s is not None else []),
               ("TPOT", lambda r: [r.tpot_s] if r.tpot_s is not None else []),
               ("ITL", lambda r: r.itl_s), ("E2E", lambda r: [r.e2e_s])]
    for ax, (name, get) in zip(axes.flat, metrics):
        for p in points:
            xs = sorted(v * 1000 for r in p.records if r.ok for v in get(r))
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post", label=p.load.label)
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    if axes.flat[0].get_lines():  # none when every request failed
        axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(path: Path, summaries: list[Summary]) -> None:
    summaries = [s for s in summaries if math.isfinite(s.value)]  # rate=inf has no place on the axis
    if len(summaries) < 2:
        return
    plt = _pyplot()
    xs = [s.value for s in summaries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(xs, [s.output_throughput for s in summaries], "o-", label="output tok/s")
    left.set(title="throughput", xlabel=summaries[0].kind, ylabel="output tokens / s")
    twin = left.twinx()
    twin.plot(xs, [s.request_throughput for s in summaries], "s--", color="tab:orange", label="req/s")
    twin.set_ylabel("requests / s")
    for name, attr in (("TTFT", "ttft"), ("ITL", "itl"), ("E2E", "e2e")):
        right.plot(xs, [getattr(s, attr).p99 if getattr(s, attr) else float("nan") for s in summaries], "o-",
                   label=f"p99 {name}")
    right.set(title="p99 latency", xlabel=summaries[0].kind, ylabel="ms", yscale="log")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the swept values themselves, not powers of two
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
