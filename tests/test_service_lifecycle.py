"""Worker death and restart, admission control, SIGTERM drain, and the Thinking reasoning split, each against a
real server subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest
from tokenizers import Tokenizer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qnext.rpc import convert
from qnext.rpc.client import Client
from qnext.rpc.text import THINK_END
from test_service_support import ServerProcess

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def server(default_ckpt, tmp_path_factory):
    s = ServerProcess(default_ckpt, "--max-pending-requests", "3", "--drain-grace-period", "60",
                      log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    s.stop()


def watch_health(target: str, seen: list[int], stop: threading.Event) -> threading.Thread:
    def run() -> None:
        with grpc.insecure_channel(target) as ch:
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=convert.SERVICE_NAME))
            threading.Thread(target=lambda: (stop.wait(), call.cancel()), daemon=True).start()
            try:
                for resp in call:
                    seen.append(resp.status)
            except grpc.RpcError:
                pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def first_tokens(call) -> None:
    async for chunk in call:
        if chunk.token_ids:
            return


def test_admission_is_bounded(server):
    async def go():
        async with Client(server.target) as c:
            calls = [c.generate_stream(text=f"fill {i}", max_new_tokens=500, ignore_eos=True) for i in range(3)]
            for call in calls:
                await first_tokens(call)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(text="one too many", max_new_tokens=2)
            for call in calls:
                call.cancel()
            # cancelled requests count against the bound until the worker has let go of them
            while (await c.server_stats()).num_pending:
                await asyncio.sleep(0.01)
            return e.value
    err = asyncio.run(go())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-pending-requests" in err.details()


def test_kill_9_worker_mid_stream(server, report):
    seen: list[int] = []
    stop = threading.Event()
    watcher = watch_health(server.target, seen, stop)

    async def go():
        async with Client(server.target) as c:
            pid = (await c.server_stats()).worker_pid
            call = c.generate_stream(text="doomed", max_new_tokens=1000, ignore_eos=True)
            await first_tokens(call)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call:
                    pass
            return pid, e.value.code(), time.monotonic() - killed
    pid, code, latency = asyncio.run(go())
    assert code == grpc.StatusCode.UNAVAILABLE and latency < 2.0
    report("kill -9 -> UNAVAILABLE (s)", round(latency, 3))
    start = time.monotonic()
    server.wait_serving(120)
    report("worker restart -> SERVING (s)", round(time.monotonic() - start, 1))

    async def after():
        async with Client(server.target) as c:
            return await c.generate(text="alive again", temperature=0.0, max_new_tokens=3), await c.server_stats()
    res, stats = asyncio.run(after())
    stop.set()
    watcher.join(5)
    assert len(res.token_ids) == 3 and stats.num_worker_restarts == 1 and stats.worker_pid != pid
    assert seen[:3] == [SERVING, NOT_SERVING, SERVING], seen


def test_sigterm_drains_then_exits_0(server):
    async def go():
        async with Client(server.target) as c:
            call = c.generate_stream(text="finish me", max_new_tokens=12, ignore_eos=True, temperature=0.0)
            await first_tokens(call)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(text="too late", max_new_tokens=2)
            ids, finish = [], None
            async for chunk in call:
                ids += chunk.token_ids
                finish = chunk.finish if chunk.HasField("finish") else finish
            return e.value.code(), finish
    refused, finish = asyncio.run(go())
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert finish is not None and convert.finish_reason_name(finish.reason) == "length"
    assert finish.usage.completion_tokens == 12
    assert server.proc.wait(timeout=30) == 0


def test_kill_9_server_mid_stream_ends_the_worker(default_ckpt, tmp_path, report):
    """A server killed outright (no drain, no Shutdown message) leaves no worker behind: the worker's next send
    finds the pipe broken and it exits, saying why, while it still had a request running."""
    s = ServerProcess(default_ckpt, log_path=tmp_path / "server.log")

    async def go():
        async with Client(s.target) as c:
            pid = (await c.server_stats()).worker_pid
            call = c.generate_stream(text="orphaned", max_new_tokens=1000, ignore_eos=True)
            await first_tokens(call)
            s.proc.kill()
            call.cancel()
            return pid
    try:
        pid = asyncio.run(go())
        killed = time.monotonic()
        s.proc.wait(10)
        while time.monotonic() - killed < 30:
            try:
                os.kill(pid, 0)  # our child's child: init reaps it once it exits
            except ProcessLookupError:
                break
            time.sleep(0.05)
        gone = time.monotonic() - killed
    finally:
        s.stop()
    report("server kill -9 -> worker gone (s)", round(gone, 2))
    assert gone < 30, "the worker outlived its server"
    assert "the server is gone; the worker exits" in (tmp_path / "server.log").read_text()


def test_thinking_template_separates_reasoning(default_ckpt, tmp_path):
    from qnext.worker.tiny import default_checkpoint
    ckpt = default_checkpoint(thinking=True)  # same cache dir as default_ckpt (its env is set for the session)
    s = ServerProcess(ckpt, "--reasoning-parser", log_path=tmp_path / "server.log")
    try:
        async def go():
            async with Client(s.target) as c:
                chat = [("user", "What is 2 + 2?")]
                on = await c.generate(chat=chat, temperature=0.0, max_new_tokens=6)
                off = await c.generate(chat=chat, enable_thinking=False, temperature=0.0, max_new_tokens=6)
                full_on = await c.detokenize(list(on.token_ids))
                full_off = await c.detokenize(list(off.token_ids))
                budget = await c.generate(chat=chat, temperature=0.0, max_new_tokens=24, max_reasoning_tokens=16,
                                          ignore_eos=True)
                unbounded = await c.generate(chat=chat, temperature=0.0, max_new_tokens=16)
                plp = await c.generate(chat=chat, temperature=0.0, max_new_tokens=2, prompt_logprobs=2)
                prompt = await c.tokenize(chat=chat)
                return on, off, full_on, full_off, budget, unbounded, plp, prompt, await c.model_info()
        on, off, full_on, full_off, budget, unbounded, plp, prompt, info = asyncio.run(go())
    finally:
        assert s.stop() == 0
    # Thinking on: the template opened <think>, so everything until </think> is reasoning.
    assert on.reasoning_text == full_on and on.text == "" and on.finish.usage.reasoning_tokens == 6
    # Thinking off: the template closed an empty think block, so everything is content.
    assert off.text == full_off and off.reasoning_text == "" and off.finish.usage.reasoning_tokens == 0
    think_end = Tokenizer.from_file(str(ckpt / "tokenizer.json")).token_to_id(THINK_END)
    # A reasoning budget of 16: sixteen reasoning tokens (those of the unbounded run), `</think>`, then the answer.
    assert budget.finish.usage.reasoning_tokens == 16 and list(budget.token_ids[:16]) == list(unbounded.token_ids)
    assert budget.token_ids[16] == think_end and budget.finish.usage.completion_tokens == 24
    assert budget.reasoning_text and budget.text  # both parts, split at the forced </think>
    # Prompt log-probs: one per prompt token after the first, each with its 2 alternatives, sent once.
    assert [p.token_id for p in plp.prompt_logprobs] == prompt[1:]
    assert len(prompt) == plp.finish.usage.prompt_tokens
    assert all(len(p.top) == 2 and p.logprob <= 0 for p in plp.prompt_logprobs)
    # With the reasoning parser and no --max-new-tokens-default, a request's default is the remaining context.
    assert info.default_max_new_tokens == 0
