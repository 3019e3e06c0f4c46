"""Prometheus metrics (served on their own HTTP port) and the counters behind GetServerStats."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from qnext.rpc.messages import StepResult

_PREFIX_GAUGES = {  # WorkerStats field -> (metric name, help)
    "prefix_cache_queries": ("prefix_cache_queries", "Requests looked up in the prefix cache (worker lifetime)"),
    "prefix_cache_hits": ("prefix_cache_hits", "Requests that hit the prefix cache (worker lifetime)"),
    "prefix_cache_query_tokens": ("prefix_cache_query_tokens", "Prompt tokens looked up (worker lifetime)"),
    "prefix_cache_hit_tokens": ("prefix_cache_hit_tokens", "Prompt tokens served from the cache (worker lifetime)"),
    "checkpoints_used": ("prefix_checkpoints_used", "Recurrent-state checkpoints held"),
    "checkpoints_total": ("prefix_checkpoints_total", "Recurrent-state checkpoint pool size"),
    "checkpoint_evictions": ("prefix_checkpoint_evictions", "Checkpoints evicted (worker lifetime)"),
    "kv_blocks_cached": ("prefix_kv_blocks_cached", "KV blocks holding a cached prefix"),
    "kv_block_evictions": ("prefix_kv_block_evictions", "Cached KV blocks evicted (worker lifetime)"),
}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rpcs = Counter("qnext_rpc", "Finished RPCs of qnext.v1 by method and gRPC status code (refused "
                            "ones included: invalid, unauthenticated, over the limits, draining)",
                            ["method", "code"], registry=r)
        self.requests = Counter("qnext_requests", "Finished generation requests by status: the finish reason of "
                                "those that ran, the gRPC code (lower case) of those refused or failed",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("qnext_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("qnext_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("qnext_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.inter_token = Histogram("qnext_inter_token_seconds", "Time between tokens of a stream", registry=r,
                                     buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("qnext_request_duration_seconds", "Arrival to finish", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.pending = Gauge("qnext_pending_requests", "Requests open in the server", registry=r)
        self.waiting = Gauge("qnext_num_waiting", "Requests queued in the worker's scheduler", registry=r)
        self.running = Gauge("qnext_num_running", "Sequences running in the worker", registry=r)
        self.kv_used = Gauge("qnext_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("qnext_kv_blocks_total", "KV cache blocks", registry=r)
        self.slots_used = Gauge("qnext_state_slots_used", "Recurrent-state slots in use", registry=r)
        self.slots_total = Gauge("qnext_state_slots_total", "Recurrent-state slots", registry=r)
        self.spec_drafted = Gauge("qnext_spec_drafted_tokens", "MTP draft tokens proposed (worker lifetime)",
                                  registry=r)
        self.spec_accepted = Gauge("qnext_spec_accepted_tokens", "MTP draft tokens accepted (worker lifetime)",
                                   registry=r)
        self.spec_draft_steps = Gauge("qnext_spec_draft_steps", "Decode steps of speculating requests (worker "
                                      "lifetime; drafted tokens / this = mean draft length)", registry=r)
        self.spec_draft_length = Gauge("qnext_spec_draft_length", "Mean MTP draft length the adaptive policy chose "
                                       "at the last step", registry=r)
        # prefix cache: one gauge per WorkerStats field (worker-lifetime counters are exported as gauges, like the
        # MTP ones, because a worker restart resets them)
        self.graph_steps = Gauge("qnext_cuda_graph_steps", "Decode steps replayed from a CUDA graph (worker "
                                 "lifetime; the rest ran eagerly)", registry=r)
        self.graph_padded_rows = Gauge("qnext_cuda_graph_padded_rows", "Padding sequences in those steps (batch "
                                       "rounded up to a captured size; worker lifetime)", registry=r)
        self.prefix = {f: Gauge(f"qnext_{name}", doc, registry=r) for f, (name, doc) in _PREFIX_GAUGES.items()}
        self.prefix_hit_rate = Gauge("qnext_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / "
                                     "prompt tokens looked up (worker lifetime)", registry=r)
        self.worker_ready = Gauge("qnext_worker_ready", "1 when the worker is up and ready", registry=r)
        self.worker_restarts = Counter("qnext_worker_restarts", "Worker restarts", registry=r)
        self.num_generated = 0
        self.num_prompt = 0
        self.num_finished = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.started = time.monotonic()

    def count_rpc(self, method: str, code: grpc.StatusCode) -> None:
        """Every finished qnext.v1 call, whatever ended it; Generate / GenerateUnary are the generation requests
        GetServerStats' num_requests_finished counts."""
        self.rpcs.labels(method=method, code=code.name).inc()
        if method in ("Generate", "GenerateUnary"):
            self.num_finished += 1

    def serve(self, port: int, host: str) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port (port 0 picks a free one)."""
        server = make_server(host, port, _head_as_get(make_wsgi_app(self.registry)), ThreadingWSGIServer,
                             handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="qnext-metrics", daemon=True).start()
        return server.server_port

    def on_step(self, result: StepResult) -> None:
        s = result.stats
        n = sum(len(o.new_token_ids) for o in result.outputs)
        self.num_generated += n
        self.generated_tokens.inc(n)
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 5.0:
            self._recent.popleft()
        self.waiting.set(s.num_waiting)
        self.running.set(s.num_running)
        self.kv_used.set(s.kv_blocks_used)
        self.kv_total.set(s.kv_blocks_total)
        self.slots_used.set(s.state_slots_used)
        self.slots_total.set(s.state_slots_total)
        self.spec_drafted.set(s.spec_drafted_tokens)
        self.spec_accepted.set(s.spec_accepted_tokens)
        self.spec_draft_steps.set(s.spec_draft_steps)
        self.spec_draft_length.set(s.spec_draft_length)
        self.graph_steps.set(s.cuda_graph_steps)
        self.graph_padded_rows.set(s.cuda_graph_padded_rows)
        for f, gauge in self.prefix.items():
            gauge.set(getattr(s, f))
        self.prefix_hit_rate.set(s.prefix_cache_hit_tokens / s.prefix_cache_query_tokens
                                 if s.prefix_cache_query_tokens else 0.0)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if t >= now - 5.0]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(1e-3, min(5.0, now - self.started))


def _head_as_get(app: Callable) -> Callable:
    """prometheus_client answers HEAD with 405; load balancers and uptime probes send HEAD. Same headers as GET,
    no body."""
    def head_or_get(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "HEAD":
            return app(environ, start_response)
        got: list[tuple[str, list]] = []
        body = b"".join(app({**environ, "REQUEST_METHOD": "GET"}, lambda status, headers: got.append((status, headers))))
        status, headers = got[0]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return []
    return head_or_get


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not worth a stderr line each."""
