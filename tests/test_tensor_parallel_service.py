"""qnext-serve --tensor-parallel-size 2 as a real subprocess: it serves, a crashed follower rank takes the
worker down cleanly and the whole rank group is restarted, and SIGTERM leaves no rank behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from grpc_health.v1 import health_pb2

from qnext.rpc.client import Client
from test_service_support import ServerProcess


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


def test_follower_crash_restarts_the_group_and_sigterm_joins_it(default_ckpt, tmp_path, report):
    s = ServerProcess(default_ckpt, "--tensor-parallel-size", "2", "--num-speculative-tokens", "2",
                      log_path=tmp_path / "server.log")
    try:
        async def generate():
            async with Client(s.target) as c:
                res = await c.generate(text="split me", temperature=0.0, max_new_tokens=4)
                return res, await c.server_stats()
        res, stats = asyncio.run(generate())
        assert len(res.token_ids) == 4
        rank0 = stats.worker_pid
        followers = children(rank0)
        assert len(followers) == 1, followers

        os.kill(followers[0], signal.SIGKILL)
        start = time.monotonic()
        assert wait_gone([rank0], 10), "rank 0 outlived its follower"
        report("TP follower killed -> rank 0 gone (s)", round(time.monotonic() - start, 1))
        while s.health() == health_pb2.HealthCheckResponse.SERVING:  # until the server has noticed
            assert time.monotonic() - start < 10, "health never left SERVING"
            time.sleep(0.05)
        s.wait_serving(180)
        res, stats = asyncio.run(generate())
        assert len(res.token_ids) == 4 and stats.num_worker_restarts == 1 and stats.worker_pid != rank0
        group = [stats.worker_pid, *children(stats.worker_pid)]
        assert len(group) == 2
    finally:
        code = s.stop()
    assert code == 0
    assert wait_gone(group, 10), "a rank outlived the server"
