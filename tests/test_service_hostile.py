"""The service against a hostile client (a real server in a subprocess, a real gRPC client):
- a request_id reused right after a cancel never hands one stream another's tokens, nor orphans a request;
- undecodable request bytes get INVALID_ARGUMENT with a plain message, on every method;
- every finished call is counted by method and code, refused ones included;
- a step failure injected for one request (QNEXT_INJECT_STEP_FAILURE, test only) fails that request alone with
  INTERNAL (RESOURCE_EXHAUSTED for out of memory), concurrent requests complete with their clean tokens, and the
  worker is not restarted."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qnext.rpc.client import Client
from qnext.worker.fault_injection import ENV as FAULT_ENV
from test_service_support import ServerProcess

TRIGGER = 4242  # the injected failure hits any step holding a prompt with this token id
OOM_TRIGGER = 4243


@pytest.fixture(scope="module")
def server(default_ckpt, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the spawned worker inherits the server's environment
        mp.setenv(FAULT_ENV, f"{TRIGGER},{OOM_TRIGGER}:oom")
        s = ServerProcess(default_ckpt, log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    assert s.stop() == 0


def run(coro):
    return asyncio.run(coro)


async def tokens_of(call) -> list[int]:
    return [t async for chunk in call for t in chunk.token_ids]


async def wait_idle(c: Client, within: float = 10.0):
    """Stats once the server holds nothing: no open or unconfirmed request, no running sequence."""
    deadline = time.monotonic() + within
    while True:
        s = await c.server_stats()
        if s.num_pending == 0 and s.num_running == 0 and s.num_waiting == 0:
            return s
        assert time.monotonic() < deadline, f"still busy: {s}"
        await asyncio.sleep(0.02)


def test_a_reused_request_id_is_a_label(server):
    prompt_b = "prompt B: the quick brown fox"

    async def go():
        async with Client(server.target) as c:
            want = await tokens_of(c.generate_stream(text=prompt_b, temperature=0.0, max_new_tokens=24,
                                                     ignore_eos=True))
            wrong = 0
            for i in range(30):
                first = c.generate_stream(request_id="Z", text=f"prompt A {i}", max_new_tokens=500, ignore_eos=True)
                n = 0
                async for _ in first:
                    n += 1
                    if n == 3:
                        break
                first.cancel()
                got = await tokens_of(c.generate_stream(request_id="Z", text=prompt_b, temperature=0.0,
                                                        max_new_tokens=24, ignore_eos=True))
                wrong += got != want
            # concurrent streams with one label each get their own tokens too
            same = await asyncio.gather(*[tokens_of(c.generate_stream(
                request_id="Z", text=prompt_b, temperature=0.0, max_new_tokens=24, ignore_eos=True))
                for _ in range(4)])
            s = await wait_idle(c)
            await c.reset_prefix_cache()
            after = await c.server_stats()
            return want, wrong, same, s, after
    want, wrong, same, s, after = run(go())
    assert len(want) == 24 and wrong == 0
    assert same == [want] * 4
    assert s.num_pending == 0 and after.kv_blocks_used == 0 and after.state_slots_used == 0


@pytest.mark.parametrize("method", ["Generate", "GenerateUnary", "Tokenize", "Detokenize", "GetServerStats"])
def test_undecodable_requests_are_invalid_argument(server, method):
    bad = {"garbage": b"\xff\xff\xff\xff\xff\xff", "bad utf-8": b"\x0a\x02\xff\xfe"}  # field 1 as a bad string

    async def go():
        async with grpc.aio.insecure_channel(server.target) as ch:
            path = f"/qnext.v1.Generation/{method}"
            streaming = method == "Generate"
            make = ch.unary_stream if streaming else ch.unary_unary
            call = make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            codes = {}
            for name, data in bad.items():
                try:
                    r = call(data, timeout=10)
                    if streaming:
                        async for _ in r:
                            pass
                    else:
                        await r
                    codes[name] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as e:
                    codes[name] = (e.code(), e.details())
            return codes
    codes = run(go())
    # GetServerStats takes no fields: its unknown-field bytes may parse; a string field with bad UTF-8 may not
    for name, (code, details) in codes.items():
        if method == "GetServerStats" and code == grpc.StatusCode.OK:
            continue
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert details.startswith("request: not a valid qnext.v1.") and "Error" not in details.split("(")[0]


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_refused_requests_are_counted_by_code(server):
    before = scrape(server)

    async def go():
        async with Client(server.target) as c:
            finished_before = (await c.server_stats()).num_requests_finished
            for fields in [dict(text="x", temperature=-1.0), dict(text="x", max_new_tokens=10**9), dict()]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.generate(**fields)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await c.generate(text="fine", max_new_tokens=2)
            return (await c.server_stats()).num_requests_finished - finished_before
    assert run(go()) == 4
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert delta("qnext_rpc_total", method="GenerateUnary", code="INVALID_ARGUMENT") == 3
    assert delta("qnext_rpc_total", method="GenerateUnary", code="OK") == 1
    assert delta("qnext_requests_total", status="invalid_argument") == 3
    assert delta("qnext_rpc_total", method="GetServerStats", code="OK") == 2


def test_an_injected_step_failure_fails_only_its_request(server):
    prompts = [f"innocent {i}" for i in range(3)]

    async def go():
        async with Client(server.target) as c:
            pid = (await c.server_stats()).worker_pid
            assert TRIGGER not in sum([await c.tokenize(p) for p in prompts], [])
            clean = [await tokens_of(c.generate_stream(text=p, temperature=0.0, max_new_tokens=16, ignore_eos=True))
                     for p in prompts]

            async def culprit(trigger: int):
                try:
                    await c.generate(token_ids=[11, trigger, 12], max_new_tokens=16)
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details()
            innocents = [tokens_of(c.generate_stream(text=p, temperature=0.0, max_new_tokens=16, ignore_eos=True))
                         for p in prompts]
            *got, failed, oom = await asyncio.gather(*innocents, culprit(TRIGGER), culprit(OOM_TRIGGER))
            stats = await wait_idle(c)
            return clean, got, failed, oom, pid, stats
    clean, got, (code, details), (oom_code, oom_details), pid, stats = run(go())
    assert got == clean
    assert code == grpc.StatusCode.INTERNAL and "failed" in details and "Traceback" not in details
    assert oom_code == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in oom_details
    assert stats.worker_pid == pid and stats.num_worker_restarts == 0 and stats.kv_blocks_used == 0


def test_streams_cut_by_the_drain_grace_get_a_reason(default_ckpt, tmp_path):
    s = ServerProcess(default_ckpt, "--drain-grace-period", "0.5", log_path=tmp_path / "server.log")

    async def go():
        async with Client(s.target) as c:
            call = c.generate_stream(text="long", max_new_tokens=3000, ignore_eos=True)
            async for chunk in call:
                if chunk.token_ids:
                    break
            s.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call:
                    pass
            return e.value
    error = run(go())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "drain grace period (0.5 s) is over" in error.details()
    assert s.stop() == 0


def test_a_unary_result_too_large_to_send_ends_early_and_frees_the_request(default_ckpt, tmp_path):
    """GenerateUnary keeps the whole result until the end: past the send limit (--max-message-mib) the request
    ends as soon as its result outgrows it, RESOURCE_EXHAUSTED naming what to change, its cache freed; it was
    generated to the end and then failed to send, kept meanwhile as ~2.9 KB of Python objects per token at 20
    alternatives. The same request streamed (Generate) is not limited, and small unary requests go on."""
    s = ServerProcess(default_ckpt, "--max-message-mib", "1", log_path=tmp_path / "server.log")
    big = dict(text="hello", n=16, top_logprobs=20, max_new_tokens=400, ignore_eos=True, temperature=1.0, seed=3)

    async def go():
        async with Client(s.target) as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.generate(**big)
            idle = await wait_idle(c)
            await c.reset_prefix_cache()
            after = await c.server_stats()
            streamed = [0] * 16
            async for chunk in c.generate_stream(**big):
                streamed[chunk.index] += len(chunk.token_ids)
            small = await c.generate(text="hello", n=2, top_logprobs=2, max_new_tokens=8, ignore_eos=True)
            return e.value, idle, after, streamed, small
    error, idle, after, streamed, small = run(go())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the server's 1 MiB message limit" in error.details()
    assert "n=16 samples, top_logprobs=20): use Generate" in error.details()
    tokens = int(error.details().split(" after ")[1].split(" tokens")[0])
    assert 16 * 200 < tokens < 16 * 400  # 1 MiB is ~280 tokens a sample at 20 alternatives: ended there
    assert idle.num_pending == 0 and after.kv_blocks_used == 0 and after.state_slots_used == 0
    assert streamed == [400] * 16  # ~1.5 MB in all, streamed
    assert [len(ch.token_ids) for ch in small.choices] == [8, 8] and len(small.choices[1].logprobs) == 8
    assert s.stop() == 0
