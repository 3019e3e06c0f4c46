"""One streaming Generate measured from the client's side, and one load point (a load held for a request
count or a duration) run against a target.

Times are taken when each GenerateResponse is read. The server may pack several tokens into one response when
the client reads slower than it generates; the k tokens of such a response after a gap g each get an
inter-token latency of g / k, and extra tokens in the first response get 0, so a request's ITL list always
has (tokens - 1) entries and sums to (last token time - first token time).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from qnext.rpc import convert
from qnext.rpc.client import Client
from qnext.rpc.loadtest.arrival import Load, drive
from qnext.rpc.loadtest.workload import RequestSpec
from qnext.rpc.security import ClientSecurity


@dataclass
class RequestRecord:
    start_s: float  # since the start of the load point
    status: str = "OK"  # gRPC status code name
    error: str = ""
    ttft_s: float | None = None  # None: no token arrived
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # counted from the stream's token_ids
    prompt_tokens: int = 0  # Usage.prompt_tokens (or the prompt's length when no Usage came)
    cached_tokens: int = 0  # Usage.cached_tokens: prompt tokens the server's prefix cache served
    usage_completion_tokens: int | None = None  # Usage.completion_tokens of the final response
    requested_tokens: int = 0
    finish_reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def send_one(client: Client, spec: RequestSpec, t0: float, *, ignore_eos: bool,
                   extra: dict[str, Any], timeout: float | None) -> RequestRecord:
    start = time.perf_counter()
    rec = RequestRecord(start_s=start - t0, requested_tokens=spec.max_new_tokens,
                        prompt_tokens=len(spec.token_ids or []))
    last = start
    try:
        stream = client.generate_stream(timeout=timeout, max_new_tokens=spec.max_new_tokens, ignore_eos=ignore_eos,
                                        **spec.prompt_fields(), **extra)
        async for resp in stream:
            now = time.perf_counter()
            k = len(resp.token_ids)
            if k:
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                    rec.itl_s += [0.0] * (k - 1)
                else:
                    rec.itl_s += [(now - last) / k] * k
                rec.output_tokens += k
                last = now
            if resp.HasField("finish"):
                rec.finish_reason = convert.finish_reason_name(resp.finish.reason)
                rec.usage_completion_tokens = resp.finish.usage.completion_tokens
                rec.prompt_tokens = resp.finish.usage.prompt_tokens
                rec.cached_tokens = resp.finish.usage.cached_tokens
    except grpc.aio.AioRpcError as e:
        rec.status, rec.error = e.code().name, e.details() or ""
    rec.e2e_s = time.perf_counter() - start
    if rec.ok and rec.finish_reason == "error":  # the proto's in-band failure, should a server use it
        rec.status, rec.error = "FINISH_REASON_ERROR", "the final response's finish reason is ERROR"
    return rec


class Progress:
    """A one-line live counter on stderr, redrawn at most every 0.2 s."""

    def __init__(self, label: str, total: int | None, duration_s: float | None) -> None:
        self.label, self.total, self.duration_s = label, total, duration_s
        self.start = time.perf_counter()
        self.done = self.errors = 0
        self._drawn = 0.0

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.errors += not rec.ok
        now = time.perf_counter()
        if now - self._drawn >= 0.2 or self.done == self.total:
            self._drawn = now
            self.draw(now)

    def draw(self, now: float) -> None:
        elapsed = now - self.start
        if self.total:
            width = 30
            filled = width * self.done // self.total
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done} done, {elapsed:.0f}/{self.duration_s:.0f} s"
        sys.stderr.write(f"\r{self.label}: {bar}  {self.errors} errors  {self.done / max(elapsed, 1e-9):.2f} req/s ")
        sys.stderr.flush()

    def close(self) -> None:
        self.draw(time.perf_counter())
        sys.stderr.write("\n")
        sys.stderr.flush()


@dataclass
class PointResult:
    load: Load
    records: list[RequestRecord]
    duration_s: float  # first request sent -> last response read


async def run_point(target: str, load: Load, requests: Iterator[RequestSpec], *, num_requests: int | None,
                    duration_s: float | None, ignore_eos: bool = False, extra: dict[str, Any] | None = None,
                    timeout: float | None = None, seed: int = 0, progress: bool = True,
                    security: ClientSecurity | None = None) -> PointResult:
    """Hold `load` until num_requests have been sent or duration_s has passed, then wait for the stragglers."""
    assert (num_requests is None) != (duration_s is None), "a request count or a duration"
    bar = Progress(load.label, num_requests, duration_s) if progress else None
    sent = 0
    async with Client(target, security=security) as client:
        t0 = time.perf_counter()

        def next_request() -> RequestSpec | None:
            nonlocal sent
            if num_requests is not None and sent >= num_requests:
                return None
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                return None
            sent += 1
            return next(requests)

        async def send(spec: RequestSpec) -> RequestRecord:
            rec = await send_one(client, spec, t0, ignore_eos=ignore_eos, extra=extra or {}, timeout=timeout)
            if bar:
                bar.update(rec)
            return rec
        records = await drive(load, next_request, send, seed)
        duration = time.perf_counter() - t0
    if bar:
        bar.close()
    return PointResult(load, sorted(records, key=lambda r: r.start_s), duration)


async def model_info(target: str, timeout: float = 10.0, security: ClientSecurity | None = None) -> Any | None:
    """The target's ModelInfo, or None when it does not answer (the load point will then report why)."""
    async with Client(target, timeout=timeout, security=security) as client:
        try:
            return await client.model_info()
        except grpc.aio.AioRpcError:
            return None
