"""`python -m qnext.rpc.server` in a subprocess on free localhost ports, for the benchmarks (bench/soak.py) and the
service tests (tests/test_service_support.py builds on it): the server's first stdout line names its ports, then
health turns SERVING. A server whose start fails is killed, not left running with its worker."""

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
_BANNER = re.compile(r"listening on [\d.]+:(\d+) \(gRPC\), metrics (?:on [\d.]+:(\d+)|off)")


class LocalServer:
    def __init__(self, *args: str, log_path: Path | None = None, credentials: grpc.ChannelCredentials | None = None,
                 start_timeout: float = 300) -> None:
        """`args`: qnext-serve's flags after the local host / free ports / JSON logs set here (no --model: the
        embedded default). `credentials`: what the health checks connect with when `args` make the server TLS."""
        self.credentials = credentials
        cmd = [sys.executable, "-m", "qnext.rpc.server", "--host", "127.0.0.1", "--port", "0",
               "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--log-format", "json", *args]
        self.log_path = log_path or Path(os.devnull)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True)
        try:
            line = self._read_line(start_timeout)
            m = _BANNER.search(line)
            if not m:
                raise RuntimeError(f"unexpected first line from the server: {line!r}")
            self.port, self.metrics_port = int(m.group(1)), int(m.group(2) or -1)  # -1: metrics off
            self.target = f"127.0.0.1:{self.port}"
            self.banner = line.strip()
            self.wait_serving(60)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            raise

    def _read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                return self.proc.stdout.readline()
        raise TimeoutError("the server did not start")

    def health(self, service: str = "") -> int:
        """The health status of `service` ("" = the server), -1 when the check itself fails."""
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
            if time.monotonic() > deadline:
                raise TimeoutError("the server never became SERVING")
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM (drain), SIGKILL after 30 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
