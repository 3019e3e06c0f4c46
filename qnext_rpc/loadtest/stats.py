"""Summary statistics of one load point: latency percentiles, throughput, goodput under SLOs, errors by code.

Latencies are over successful requests only (a request that failed fast would flatter them); ITL pools every
inter-token gap of every successful request. Throughputs divide by the point's wall time (first request sent
to last response read). Goodput counts successful requests that met every given SLO (TTFT and TPOT).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from qnext.rpc.loadtest.runner import PointResult


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    assert values, "no values"
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Distribution:
    """In milliseconds."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @staticmethod
    def of_seconds(values: list[float]) -> "Distribution | None":
        if not values:
            return None
        ms = [v * 1000 for v in values]
        return Distribution(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99),
                            max(ms))


@dataclass(frozen=True)
class Summary:
    label: str
    kind: str
    value: float
    num_requests: int
    num_ok: int
    errors: dict[str, int]  # status code name -> count
    error_examples: dict[str, str]  # status code name -> the first such error's message
    duration_s: float
    request_throughput: float  # successful requests / s
    output_throughput: float  # output tokens of successful requests / s
    total_token_throughput: float  # prompt + output tokens of successful requests / s
    mean_prompt_tokens: float
    mean_output_tokens: float
    mean_cached_tokens: float  # prompt tokens served from the server's prefix cache
    num_usage_mismatches: int  # successful requests whose streamed token count != Usage.completion_tokens
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2e: Distribution | None
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    goodput: float | None  # requests / s meeting the SLOs (None when no SLO is given)
    goodput_fraction: float | None  # of all requests sent

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meets(ttft_s: float | None, tpot_s: float | None, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and (ttft_s is None or ttft_s * 1000 > slo_ttft_ms):
        return False
    # A one-token answer has no TPOT, so it cannot miss a TPOT SLO.
    return slo_tpot_ms is None or tpot_s is None or tpot_s * 1000 <= slo_tpot_ms


def summarize(point: PointResult, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> Summary:
    ok = [r for r in point.records if r.ok]
    n = len(point.records)
    dur = max(point.duration_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    goodput = fraction = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(_meets(r.ttft_s, r.tpot_s, slo_ttft_ms, slo_tpot_ms) for r in ok)
        goodput, fraction = good / dur, good / n if n else 0.0
    return Summary(
        label=point.load.label, kind=point.load.kind, value=point.load.value, num_requests=n, num_ok=len(ok),
        errors=dict(Counter(r.status for r in point.records if not r.ok)),
        error_examples={r.status: r.error for r in reversed(point.records) if not r.ok}, duration_s=point.duration_s,
        request_throughput=len(ok) / dur, output_throughput=out_tokens / dur,
        total_token_throughput=(out_tokens + prompt_tokens) / dur,
        mean_prompt_tokens=prompt_tokens / len(ok) if ok else 0.0,
        mean_output_tokens=out_tokens / len(ok) if ok else 0.0,
        mean_cached_tokens=sum(r.cached_tokens for r in ok) / len(ok) if ok else 0.0,
        num_usage_mismatches=sum(r.usage_completion_tokens != r.output_tokens for r in ok),
        ttft=Distribution.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=Distribution.of_seconds([t for r in ok if (t := r.tpot_s) is not None]),
        itl=Distribution.of_seconds([g for r in ok for g in r.itl_s]),
        e2e=Distribution.of_seconds([r.e2e_s for r in ok]),
        slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, goodput=goodput, goodput_fraction=fraction)
