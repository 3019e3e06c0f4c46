"""qnext-bench against a real local server: internally consistent numbers, errors reported by gRPC code, result
files and plots written; unit tests of the statistics, the Poisson arrivals and the workload."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from qnext.rpc.loadtest import cli
from qnext.rpc.loadtest.arrival import open_loop, poisson_gaps
from qnext.rpc.loadtest.stats import percentile
from qnext.rpc.loadtest.workload import Length, Workload, load_dataset
from test_service_support import ServerProcess

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(default_ckpt, tmp_path_factory):
    s = ServerProcess(default_ckpt, log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    assert s.stop() == 0


def bench(*args: str, out: Path, plots: bool = False) -> tuple[int, dict]:
    """Run qnext-bench in-process; plots (and the progress line) only where a test looks at them: matplotlib
    costs seconds on this machine."""
    rc = cli.main([*args, "--output-dir", str(out), *([] if plots else ["--no-plots", "--no-progress"])])
    return rc, json.loads((out / "result.json").read_text())


def test_sweep_numbers_are_internally_consistent(server, tmp_path, capsys):
    rc, doc = bench("--target", server.target, "--concurrency", "1,3", "--num-requests", "3", "--input-len", "8",
                    "--output-len", "4", "--ignore-eos", "--slo-ttft-ms", "60000", out=tmp_path, plots=True)
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "\rconcurrency=3: [" in captured.err and "3/3  0 errors" in captured.err  # the live progress line
    assert "concurrency=1: 3/3 ok" in printed and "concurrency=3: 3/3 ok" in printed and "x first" in printed
    assert [p["summary"]["value"] for p in doc["points"]] == [1, 3]
    assert doc["config"]["server"]["max_num_seqs"] == 32
    for point in doc["points"]:
        s, reqs = point["summary"], point["requests"]
        assert s["num_requests"] == s["num_ok"] == len(reqs) == 3 and s["errors"] == {}
        for r in reqs:
            # tokens counted from the stream == Usage == what ignore_eos forced
            assert r["output_tokens"] == r["usage_completion_tokens"] == r["requested_tokens"] == 4
            assert r["prompt_tokens"] == 8 and r["finish_reason"] == "length"
            assert r["cached_tokens"] == 0  # random prompts, none repeated across the sweep
            assert 0 < r["ttft_s"] <= r["e2e_s"]
            assert len(r["itl_s"]) == 3 and sum(r["itl_s"]) <= r["e2e_s"] - r["ttft_s"] + 1e-9
            assert 0 <= r["start_s"] and r["start_s"] + r["e2e_s"] <= s["duration_s"] + 1e-6
        assert s["num_usage_mismatches"] == 0
        assert s["request_throughput"] == pytest.approx(3 / s["duration_s"])
        assert s["output_throughput"] == pytest.approx(12 / s["duration_s"])
        assert s["total_token_throughput"] == pytest.approx((12 + 24) / s["duration_s"])
        assert s["itl"]["n"] == 9 and s["ttft"]["n"] == s["e2e"]["n"] == 3
        assert s["ttft"]["p50"] <= s["ttft"]["p99"] <= s["ttft"]["max"]
        assert s["goodput_fraction"] == 1.0  # a one-minute TTFT SLO
    # concurrency 1 runs one request at a time: starts follow ends
    serial = doc["points"][0]["requests"]
    assert all(b["start_s"] >= a["start_s"] + a["e2e_s"] for a, b in zip(serial, serial[1:]))
    for name in ("latency_cdf.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_server_errors_are_counted_by_code(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [
        {"text": "Hello there", "output_len": 2},
        {"token_ids": [1, 2, 3, 10 ** 9], "output_len": 2},  # an id beyond the vocabulary: INVALID_ARGUMENT
        {"chat": [{"role": "user", "content": "Hi"}], "output_len": 2},
    ]) + "\n")
    rc, doc = bench("--target", server.target, "--concurrency", "3", "--num-requests", "3", "--dataset", str(data),
                    "--ignore-eos", out=tmp_path)
    assert rc == 0
    s, reqs = doc["points"][0]["summary"], doc["points"][0]["requests"]
    assert s["num_ok"] == 2 and s["errors"] == {"INVALID_ARGUMENT": 1}
    assert "token_ids" in s["error_examples"]["INVALID_ARGUMENT"]
    assert sorted(r["output_tokens"] for r in reqs) == [0, 2, 2]
    # a max_new_tokens beyond the server's max_model_len (4096) is refused for every request
    rc, doc = bench("--target", server.target, "--num-requests", "2", "--input-len", "4", "--output-len", "5000",
                    out=tmp_path / "long")
    assert rc == 1 and doc["points"][0]["summary"]["errors"] == {"INVALID_ARGUMENT": 2}


def test_prefix_cache_hits_are_reported_and_bypassed(server, tmp_path):
    data = tmp_path / "grow.jsonl"  # the second prompt extends the first (an exact repeat has nothing left to
    prefix = list(range(1000, 1040))  # compute, so the server serves it from a checkpoint short of its end)
    data.write_text(json.dumps({"token_ids": prefix, "output_len": 2}) + "\n" +
                    json.dumps({"token_ids": prefix + list(range(2000, 2008)), "output_len": 2}) + "\n")
    for bypass, out in ((True, tmp_path / "bypass"), (False, tmp_path / "cached")):
        args = ["--target", server.target, "--num-requests", "2", "--dataset", str(data), "--ignore-eos"]
        rc, doc = bench(*args, *(["--bypass-prefix-cache"] if bypass else []), out=out)
        cached = [r["cached_tokens"] for r in doc["points"][0]["requests"]]
        # sent one after the other: the second hits the first's end-of-prompt checkpoint unless bypassed
        assert rc == 0 and (cached == [0, 0] if bypass else cached[1] > 0), cached


def test_json_schema_and_tools_are_sent(server, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], '
                      '"additionalProperties": false}')
    tools = tmp_path / "tools.json"
    tools.write_text('[{"name": "ping", "parameters": {"type": "object", "properties": {}, '
                     '"additionalProperties": false}}]')
    data = tmp_path / "chat.jsonl"
    # room for several calls: "required" means one or more, and the random model makes a second one about one
    # time in five (15 tokens each); at 40 tokens, 1 request in 40 ran out of room (finish "length")
    data.write_text(json.dumps({"chat": [{"role": "user", "content": "Hi"}], "output_len": 150}) + "\n")
    rc, doc = bench("--target", server.target, "--num-requests", "2", "--input-len", "4", "--output-len", "40",
                    "--json-schema", str(schema), out=tmp_path / "schema")
    reqs = doc["points"][0]["requests"]
    # {"ok": true} or {"ok": false}, then EOS: a handful of tokens, not the 40 asked for
    assert rc == 0 and all(r["finish_reason"] == "eos" and r["output_tokens"] < 12 for r in reqs), reqs
    rc, doc = bench("--target", server.target, "--num-requests", "2", "--dataset", str(data), "--tools", str(tools),
                    "--tool-choice", "required", out=tmp_path / "tools")
    assert rc == 0 and all(r["finish_reason"] == "tool_calls" for r in doc["points"][0]["requests"])


def test_unreachable_target_is_unavailable(tmp_path, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc, doc = bench("--target", f"127.0.0.1:{port}", "--num-requests", "3", out=tmp_path, plots=True)
    assert rc == 1 and "did not answer GetModelInfo" in capsys.readouterr().err
    s = doc["points"][0]["summary"]
    assert s["num_ok"] == 0 and s["errors"] == {"UNAVAILABLE": 3} and s["ttft"] is None
    assert (tmp_path / "latency_cdf.png").read_bytes()[:8] == PNG


def test_poisson_rate_for_a_duration(server, tmp_path):
    rc, doc = bench("--target", server.target, "--request-rate", "4", "--duration", "1", "--input-len", "4",
                    "--output-len", "2", out=tmp_path)
    assert rc == 0
    reqs = doc["points"][0]["requests"]
    assert reqs and all(r["start_s"] < 1.0 for r in reqs) and all(r["status"] == "OK" for r in reqs)


@pytest.mark.parametrize("flags, flag", [
    (["--concurrency", "0"], "--concurrency"), (["--concurrency", "2.5"], "--concurrency"),
    (["--request-rate", "fast"], "--request-rate"), (["--num-requests", "0"], "--num-requests"),
    (["--duration", "-1"], "--duration"), (["--input-len", "0"], "--input-len"),
    (["--output-len-range", "1.5"], "--output-len-range"), (["--dataset", "/nonexistent.jsonl"], "--dataset"),
    (["--target", "localhost"], "--target"), (["--slo-tpot-ms", "0"], "--slo-tpot-ms"),
    (["--json-schema", "/nonexistent.json"], "--json-schema"), (["--tools", "/nonexistent.json"], "--tools"),
    (["--json-schema", __file__, "--ignore-eos"], "--ignore-eos"),
])
def test_bad_flags_name_the_flag(flags, flag, capsys):
    assert cli.main(flags) == 2
    assert capsys.readouterr().err.startswith(f"qnext-bench: {flag}:")


def test_bad_dataset_line_is_named(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n{"text": "a", "token_ids": [1]}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: give exactly one of text, token_ids, chat"):
        load_dataset(data)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(xs, q) == pytest.approx(np.percentile(xs, q), rel=1e-12)


def test_poisson_gaps_have_the_exponential_law():
    rate, n = 5.0, 20000
    gaps = [g for g, _ in zip(poisson_gaps(rate, random.Random(0)), range(n))]
    # The mean of n exponential gaps has standard error (1/rate)/sqrt(n) = 0.7% of the mean here; 4 standard
    # errors (2.8%) would fail by chance about once in 16,000 seeds.
    assert np.mean(gaps) == pytest.approx(1 / rate, rel=4 / math.sqrt(n))
    # Memorylessness shows in the tail: P(gap > mean) = 1/e for an exponential (0.5 for a uniform or a normal);
    # the binomial standard error is sqrt(p(1-p)/n) = 0.0034, 4 of them = 0.014.
    tail = np.mean(np.array(gaps) > 1 / rate)
    assert tail == pytest.approx(math.exp(-1), abs=4 * math.sqrt(math.exp(-1) * (1 - math.exp(-1)) / n))
    assert all(g == 0 for g, _ in zip(poisson_gaps(math.inf, random.Random(0)), range(10)))


def test_open_loop_starts_requests_on_schedule():
    rate, n = 200.0, 60
    expected = np.cumsum([g for g, _ in zip(poisson_gaps(rate, random.Random(7)), range(n))])
    items = iter(range(n))
    starts: list[float] = []

    async def send(i: int) -> int:
        starts.append(time.perf_counter())
        await asyncio.sleep(0.05)  # in flight while later ones start: the open loop never waits for them
        return i

    async def go() -> list[int]:
        t0 = time.perf_counter()
        out = await open_loop(rate, random.Random(7), lambda: next(items, None), send)
        starts[:] = [s - t0 for s in starts]
        return out
    assert sorted(asyncio.run(go())) == list(range(n))
    late = np.array(starts) - expected
    assert late.min() >= -1e-3  # never early (sleep until an absolute due time)
    assert np.median(late) < 0.05  # and not drifting behind on a busy machine


def test_synthetic_workload_is_reproducible_and_within_range():
    w = Workload(Length(10, 0.5), Length(20, 0.5), vocab_size=50, excluded_ids=frozenset({0, 1}), seed=3)
    a = [x for x, _ in zip(w.requests(), range(50))]
    b = [x for x, _ in zip(w.requests(), range(50))]
    assert a == b  # the same seed sends the same requests
    assert all(10 <= len(x.token_ids) <= 30 and 5 <= x.max_new_tokens <= 15 for x in a)
    assert not {0, 1} & {t for x in a for t in x.token_ids}
    assert len({len(x.token_ids) for x in a}) > 5
