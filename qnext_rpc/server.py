"""`qnext-serve`: the gRPC server (Generation + grpc.health.v1 + reflection), Prometheus metrics, signals.

Start-up: what needs torch to check (no --model: the embedded default's directory; the MTP head, the
tensor-parallel split) is checked in a short-lived subprocess (qnext/rpc/preflight.py): this process never
imports torch. Then spawn the worker (it loads the model) while the tokenizer loads here; health turns SERVING
when the worker's readiness handshake arrives. SIGTERM / SIGINT: health NOT_SERVING, new requests refused with
UNAVAILABLE, in-flight ones drained for up to --drain-grace-period seconds, then exit 0.

Security (qnext/rpc/security.py): --api-key (or $QNEXT_API_KEY) requires `authorization: Bearer KEY` on every
qnext.v1 call, health and reflection stay open; --ssl-certfile / --ssl-keyfile serve TLS, --ssl-ca-certs mutual TLS.

The engine's flags are EngineConfig's (worker/engine_flags.py), the same as qnext-batch's.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from qnext.rpc import convert
from qnext.rpc.batcher import Batcher, WorkerStartFailed, WorkerUnavailable
from qnext.rpc.logs import configure_logging
from qnext.rpc.metrics import Metrics
from qnext.rpc.preflight import run_preflight
from qnext.rpc.security import (ApiKeyInterceptor, ServerTLS, add_server_security_flags, api_key_from,
                                server_tls_problem)
from qnext.rpc.service import GenerationService
from qnext.rpc.text import TextProcessor
from qnext.rpc.validate import Limits
from qnext.rpc.worker_env import resolve_preload
from qnext.worker.cli_help import HelpFormatter
from qnext.worker.grammar import GrammarCompiler
from qnext.worker.engine_flags import add_engine_flags, engine_config_from_args, name_the_flag
from qnext.worker.types import EngineConfig

log = structlog.get_logger("qnext.server")
MAX_MESSAGE_MIB_LIMIT = 2047  # gRPC keeps message limits in an int32 of bytes


class StartupError(RuntimeError):
    """The gRPC port cannot be opened as configured: main() reports the message and exits 2."""


SCHEDULING_POLICIES = ("fcfs", "priority")


DEFAULT_MAX_NEW_TOKENS = 2048  # without a reasoning parser
UDS_PATH_MAX = 107  # bytes of a unix socket's path (sun_path holds 108 with the terminating NUL)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090  # 0 = a free port, -1 = off
    max_pending_requests: int = 256
    default_max_new_tokens: int | None = None  # None: 2048, or the remaining context with a reasoning parser
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    reasoning_parser: str | None = None
    drain_grace_period_s: float = 30.0
    api_key: str | None = field(default=None, repr=False)  # None: no authentication
    tls: ServerTLS | None = None  # None: plaintext
    worker_preload: tuple[str, ...] = ()  # libraries in the worker's LD_PRELOAD (resolve_preload)
    stream_interval: int = 1  # tokens per streamed response after the first (GenerationService)
    scheduling_policy: str = "fcfs"  # "priority": requests' `priority` field is honoured (else it must be 0)
    uds: str | None = None  # also serve on this unix domain socket (plaintext, owner-only), e.g. for health checks
    max_message_mib: int = 64  # the largest gRPC message received or sent (a GenerateUnary result must fit)

    def __post_init__(self) -> None:
        for name in ("max_pending_requests", "default_max_new_tokens", "max_stop_strings", "max_stop_string_length",
                     "stream_interval", "max_message_mib"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_message_mib > MAX_MESSAGE_MIB_LIMIT:
            raise ValueError(f"max_message_mib: must be <= {MAX_MESSAGE_MIB_LIMIT}, got {self.max_message_mib}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy: one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        if self.reasoning_parser not in (None, "qwen3"):
            raise ValueError(f"reasoning_parser: only qwen3 (<think>...</think>) exists, got {self.reasoning_parser!r}")

    @property
    def max_new_tokens_default(self) -> int:
        """max_new_tokens of a request that gives none, 0 = the remaining context: a Thinking model's trace is
        long (the model card recommends tens of thousands of tokens), so with the reasoning parser on and no
        --max-new-tokens-default, only the context bounds it."""
        if self.default_max_new_tokens is not None:
            return self.default_max_new_tokens
        return 0 if self.reasoning_parser is not None else DEFAULT_MAX_NEW_TOKENS


def _grammar_compiler(model_dir: Path, vocab_size: int, eos_token_ids: tuple[int, ...]) -> GrammarCompiler | None:
    """The compiler for constrained requests, its tokenizer built on a thread now (~1 s for 151k tokens) so the
    first constrained request does not wait for it; None without tokenizer.json (those requests are refused)."""
    if not (model_dir / "tokenizer.json").is_file():
        return None
    compiler = GrammarCompiler(model_dir / "tokenizer.json", vocab_size, eos_token_ids)
    threading.Thread(target=lambda: compiler.tokenizer, name="qnext-grammar-tokenizer", daemon=True).start()
    return compiler


def _default_sampling(model_dir: Path) -> dict[str, float | int]:
    path = model_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    return {k: gen[k] for k in ("temperature", "top_p", "top_k") if gen.get(k) is not None}


class Server:
    def __init__(self, cfg: ServerConfig, engine: EngineConfig) -> None:
        """`engine.model` must be set (`run_preflight` resolves None to the embedded default's directory)."""
        self.cfg = cfg
        self.engine = engine
        self.metrics = Metrics()
        self.health = HealthServicer()
        self.batcher = Batcher(engine, cfg.max_pending_requests, self._on_ready_change, list(cfg.worker_preload))
        self.batcher.on_step = self.metrics.on_step
        self.grpc: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = -1
        self._stopped = asyncio.Event()
        self._draining = False

    def _on_ready_change(self, ready: bool) -> None:
        self.metrics.worker_ready.set(1 if ready else 0)
        if not ready:
            self.metrics.worker_restarts.inc()
        status = health_pb2.HealthCheckResponse.SERVING if ready and not self._draining \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", convert.SERVICE_NAME):
            asyncio.ensure_future(self.health.set(name, status))

    async def start(self) -> None:
        for name in ("", convert.SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        started = asyncio.ensure_future(self.batcher.start())
        await asyncio.sleep(0)  # let the worker spawn before the tokenizer load blocks this thread
        model_dir = Path(self.engine.model)
        text = TextProcessor(model_dir)
        ready = await started
        m, cfg = ready.model, self.cfg
        text.grammars = _grammar_compiler(model_dir, m.vocab_size, m.eos_token_ids)
        limits = Limits(max_model_len=m.max_model_len, vocab_size=m.vocab_size,
                        max_num_speculative_tokens=self.engine.num_speculative_tokens,
                        default_max_new_tokens=cfg.max_new_tokens_default, max_stop_strings=cfg.max_stop_strings,
                        max_stop_string_length=cfg.max_stop_string_length,
                        priority_scheduling=cfg.scheduling_policy == "priority",
                        default_sampling=_default_sampling(model_dir))
        server_limits = {"max_num_seqs": self.engine.max_num_seqs,
                         "max_num_batched_tokens": self.engine.max_num_batched_tokens,
                         "max_pending_requests": cfg.max_pending_requests, "max_top_logprobs": 20}
        service = GenerationService(self.batcher, text, limits, self.metrics, cfg.reasoning_parser is not None,
                                    server_limits, cfg.stream_interval, cfg.max_message_mib << 20)
        self.grpc = grpc.aio.server(interceptors=self._interceptors(),
                                    options=[("grpc.max_receive_message_length", cfg.max_message_mib << 20),
                                             ("grpc.max_send_message_length", cfg.max_message_mib << 20)])
        convert.add_servicer(service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [convert.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.grpc)
        self.port = self._add_port(f"{cfg.host}:{cfg.port}")
        if cfg.uds is not None:
            self._add_unix_socket(cfg.uds)
        await self.grpc.start()
        self._log_security()
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
        self._on_ready_change(True)
        c = ready.cache
        cache_mib = (c.num_blocks * c.bytes_per_block + c.num_slots * c.bytes_per_slot
                     + c.num_checkpoints * c.bytes_per_checkpoint) / 2**20
        metrics = f"on {cfg.metrics_host}:{self.metrics_port}" if cfg.metrics_port >= 0 else "off"
        local = f"; also on unix:{cfg.uds}" if cfg.uds is not None else ""
        print(f"qnext-serve: listening on {cfg.host}:{self.port} (gRPC), metrics {metrics}; "
              f"model {m.model_dir} ({m.architecture}, {m.dtype}: "
              f"{m.dtype_reason}) on "
              f"{m.device}; cache {c.num_kv_tokens} KV tokens in {c.num_blocks} blocks, {c.num_slots} state slots, "
              f"{c.num_checkpoints} prefix-cache checkpoints ({cache_mib:.0f} MiB); max_model_len {m.max_model_len}; "
              f"CUDA graphs: {m.cuda_graphs}{local}",
              flush=True)

    def _add_port(self, address: str) -> int:
        try:
            port = self.grpc.add_secure_port(address, self.cfg.tls.credentials()) if self.cfg.tls \
                else self.grpc.add_insecure_port(address)
        except RuntimeError:  # grpc raises for TLS files it cannot use (the PEM files were read at start-up)
            port = 0
        if port == 0:
            why = " (or --ssl-keyfile is not the key of --ssl-certfile)" if self.cfg.tls else ""
            raise StartupError(f"--port: could not bind {address}{why}")
        return port

    def _add_unix_socket(self, path: str) -> None:
        """The same services on a unix domain socket: plaintext (TLS protects the network; this never leaves
        the host) with the API key still required, and only the server's own user may connect (the socket is
        created 0600: connecting needs write permission on it). A container's health check reaches the server
        here whatever --host, --port and TLS are. gRPC replaces a stale socket and removes it when it stops."""
        before = os.umask(0o177)  # owner-only from the start, not after a chmod
        try:
            self.grpc.add_insecure_port(f"unix:{path}")
        except RuntimeError:
            raise StartupError(f"--uds: could not bind {path} (does its directory exist, writable by this user? "
                               "is another file in the way?)") from None
        finally:
            os.umask(before)

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.cfg.api_key is None:
            return []
        # refusals never reach the service, so they are counted here (Metrics.count_rpc, where it exists)
        return [ApiKeyInterceptor(self.cfg.api_key, on_reject=getattr(self.metrics, "count_rpc", None))]

    def _log_security(self) -> None:
        cfg = self.cfg
        tls = "off" if cfg.tls is None else "mutual (client certificates required)" if cfg.tls.client_ca else "on"
        log.info("security", api_key="on" if cfg.api_key else "off", tls=tls)
        if cfg.api_key is None and cfg.tls is None and not _is_loopback(cfg.host):
            log.warning("no --api-key and no TLS: anyone who reaches the port can call every method", host=cfg.host)

    async def drain(self) -> None:
        """Refuse new requests, finish in-flight ones within the grace period, stop."""
        if self._draining:
            return
        self._draining = True
        self.batcher.draining = True
        await self.health.enter_graceful_shutdown()
        log.info("draining", open_requests=self.batcher.num_pending, grace_s=self.cfg.drain_grace_period_s)
        drained = await self.batcher.wait_idle(self.cfg.drain_grace_period_s)
        if not drained:  # each open stream ends with UNAVAILABLE and this reason, not a cut connection
            log.warning("grace period over; ending open requests", open_requests=self.batcher.num_pending)
            self.batcher.fail_open(WorkerUnavailable(
                f"the server is shutting down: the drain grace period ({self.cfg.drain_grace_period_s:g} s) is "
                "over; retry on another replica"))
        await self.grpc.stop(1.0)
        await self.batcher.close()
        log.info("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def uds_problem(path: str | None) -> str | None:
    """What is wrong with --uds PATH, checked before the model loads; None when nothing is."""
    if path is None:
        return None
    if len(os.fsencode(path)) > UDS_PATH_MAX:
        return f"--uds: {path} is longer than {UDS_PATH_MAX} bytes (the limit of a socket's path)"
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"--uds: {parent} is not a directory this user can create files in"
    if Path(path).exists() and not Path(path).is_socket():
        return f"--uds: {path} exists and is not a socket"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost
        return False


async def serve(cfg: ServerConfig, engine: EngineConfig) -> int:
    server = Server(cfg, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain()))
    try:
        await server.start()
    except (StartupError, WorkerStartFailed):
        await server.batcher.close()  # the worker was already spawned
        if server.grpc is not None:
            # a gRPC server whose port failed was never started: stop it here rather than leave it to the
            # interpreter's exit (once, CI saw such a process die of SIGSEGV after printing its error)
            await server.grpc.stop(None)
        raise
    await server.wait()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnext-serve", description="Serve a Qwen3-Next checkpoint over gRPC (qnext.v1).",
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--host", default="0.0.0.0", help="gRPC bind address")
    a("--port", type=int, default=50051, help="gRPC port (0 = a free port, printed at start)")
    a("--uds", default=None, metavar="PATH",
      help="also serve on a unix domain socket at PATH: plaintext, only this user may connect, the API key still "
           "applies; for clients on this host and the container health check (default: off)")
    a("--metrics-host", default="0.0.0.0", help="Prometheus HTTP bind address")
    a("--metrics-port", type=int, default=9090, help="Prometheus HTTP port (0 = a free port, -1 = off)")
    a("--max-pending-requests", type=int, default=256, help="open requests before RESOURCE_EXHAUSTED")
    a("--max-new-tokens-default", type=int, default=None,
      help=f"max_new_tokens when a request gives none (default: {DEFAULT_MAX_NEW_TOKENS}; with --reasoning-parser, the "
           "remaining context)")
    a("--reasoning-parser", nargs="?", const="qwen3", default=None,
      help="split <think>...</think> into reasoning_text; qwen3 when given without a value (default: off, the "
           "whole output is text)")
    a("--drain-grace-period", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    a("--stream-interval", type=int, default=1,
      help="tokens per streamed response after the first (the last may have fewer): fewer messages, less CPU per "
           "token on both ends, coarser streaming")
    a("--max-message-mib", type=int, default=64,
      help="the largest gRPC message the server receives or sends, in MiB: a GenerateUnary result over it ends "
           "with RESOURCE_EXHAUSTED as soon as it outgrows it (Generate streams any size)")
    a("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES,
      help="fcfs: first come, first served, and a request's priority must be 0; priority: requests run by their "
           "priority field (lower = sooner), preempting lower ones, then by arrival (as vLLM's flag)")
    a("--worker-preload", default="auto",
      help="libraries the worker process preloads: auto = tcmalloc and libiomp5 where installed, for a CPU worker "
           "(qnext_rpc/worker_env.py); none; or paths separated by ':'")
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="least severe level logged")
    a("--log-format", default="auto", choices=["auto", "json", "console"],
      help="auto = console on a TTY, JSON otherwise")
    add_server_security_flags(p)  # --api-key, --ssl-certfile, --ssl-keyfile, --ssl-ca-certs
    add_engine_flags(p)  # --model, --device, --max-num-seqs, ...: EngineConfig's (worker/types.py)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    engine = engine_config_from_args(args, parser)  # a bad engine value: usage error naming the flag, exit 2
    problem = server_tls_problem(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs) or uds_problem(args.uds)
    if problem:
        parser.error(problem)  # exit 2
    try:
        # the PEM files are read now: a missing one is an error naming its flag before the model loads
        tls = ServerTLS.from_files(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs)
        cfg = ServerConfig(host=args.host, port=args.port, metrics_host=args.metrics_host,
                           metrics_port=args.metrics_port, max_pending_requests=args.max_pending_requests,
                           default_max_new_tokens=args.max_new_tokens_default, reasoning_parser=args.reasoning_parser,
                           drain_grace_period_s=args.drain_grace_period, api_key=api_key_from(args.api_key), tls=tls,
                           worker_preload=tuple(resolve_preload(args.worker_preload, engine.device)),
                           stream_interval=args.stream_interval, scheduling_policy=args.scheduling_policy,
                           uds=args.uds, max_message_mib=args.max_message_mib)
        # no --model: the embedded default's directory; the MTP head and tensor-parallel split checked here, not
        # in a worker that would restart forever (in a subprocess: they need torch, this process never imports it)
        engine = run_preflight(engine)
    except (ValueError, FileNotFoundError) as e:
        print(f"qnext-serve: {name_the_flag(str(e))}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(cfg, engine))
    except StartupError as e:
        print(f"qnext-serve: {e}", file=sys.stderr)
        return 2
    except WorkerStartFailed as e:  # the engine's own check of its options, e.g. --max-model-len
        print(f"qnext-serve: {name_the_flag(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
