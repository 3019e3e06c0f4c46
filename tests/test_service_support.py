"""Helpers for the service tests (no tests here): the real server in a subprocess on free localhost ports."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVER_ARGS = ["--cache-memory", "67108864", "--max-num-seqs", "32", "--max-model-len", "4096"]


class ServerProcess:
    def __init__(self, model: Path, *extra: str, log_path: Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        """`credentials`: what the health checks connect with when `extra` makes the server TLS."""
        self.credentials = credentials
        cmd = [sys.executable, "-m", "qnext.rpc.server", "--model", str(model), "--host", "127.0.0.1", "--port", "0",
               "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--log-format", "json", *SERVER_ARGS, *extra]
        self.log_path = log_path or Path(os.devnull)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True)
        try:
            line = self._read_line(timeout=180)
            m = re.search(r"listening on [\d.]+:(\d+) \(gRPC\), metrics on [\d.]+:(-?\d+)", line)
            assert m, f"unexpected first line: {line!r}"
            self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
            self.target = f"127.0.0.1:{self.port}"
            self.banner = line
            self.wait_serving(60)
        except BaseException:  # a server that failed its start must not outlive the test (it holds a worker)
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            raise

    def _read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                return self.proc.stdout.readline()
        raise TimeoutError("server did not start")

    def health(self, service: str = "") -> int:
        with grpc.secure_channel(self.target, self.credentials) if self.credentials \
                else grpc.insecure_channel(self.target) as ch:
            try:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=5).status
            except grpc.RpcError:
                return -1

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.health() != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "server never became SERVING"
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
