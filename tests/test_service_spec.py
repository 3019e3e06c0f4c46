"""MTP speculation through gRPC: the per-request override is honoured and validated, counters reach
FinishInfo.spec and ServerStats, and greedy output equals the offline engine without speculation."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from qnext.rpc.client import Client
from test_service import DTYPE, collect, offline
from test_service_support import ServerProcess
from qnext.worker.engine import Engine
from qnext.worker.types import EngineConfig


def test_speculation_through_grpc(default_ckpt, tmp_path):
    server = ServerProcess(default_ckpt, "--num-speculative-tokens", "2", "--dtype", DTYPE, log_path=tmp_path / "server.log")
    try:
        prompt = [151644, 872, 198, 9707, 151645]

        async def go():
            async with Client(server.target) as c:
                spec = await collect(c, token_ids=prompt, max_new_tokens=10, temperature=0.0, ignore_eos=True)
                off = await collect(c, token_ids=prompt, max_new_tokens=10, temperature=0.0, ignore_eos=True,
                                    num_speculative_tokens=0)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(c, token_ids=prompt, max_new_tokens=4, num_speculative_tokens=3)
                samples = await c.generate(token_ids=prompt, max_new_tokens=8, temperature=0.8, seed=3, n=2,
                                           ignore_eos=True)
                stats = await c.server_stats()
                return spec, off, err.value, samples, stats

        spec, off, err, samples, stats = asyncio.run(go())
    finally:
        assert server.stop() == 0
    engine = Engine(EngineConfig(model=str(default_ckpt), cache_memory=64 << 20, dtype=DTYPE))  # see test_service.DTYPE
    want = offline(engine, [prompt], [dict(temperature=0.0)], [10])[0]
    assert spec[0] == want and off[0] == want
    assert spec[2].spec.drafted_tokens > 0 and off[2].spec.drafted_tokens == 0  # default = server maximum
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("num_speculative_tokens")
    assert stats.spec_drafted_tokens >= spec[2].spec.drafted_tokens
    # parallel samples speculate too, each with its own counters
    assert [r.index for r in samples.choices] == [0, 1]
    assert all(r.finish.spec.drafted_tokens > 0 and len(r.token_ids) == 8 for r in samples.choices)
