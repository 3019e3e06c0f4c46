"""Chaos soak: mixed, hostile traffic against a qnext server for minutes, then a check that nothing leaked.

    python bench/soak.py                                   # 10 min, 32 streams, worker SIGKILL every 120 s
    python bench/soak.py --minutes 2 --streams 16 --out soak.json
    python bench/soak.py --target 127.0.0.1:50051 --metrics 127.0.0.1:9090 --server-pid 1234

Without --target it starts `python -m qnext.rpc.server` on the embedded default checkpoint (no --model) on free
ports. `--streams` clients each loop over a random mix of actions (bench/soak_traffic.py): normal streams,
cancels after k chunks, short deadlines, invalid fields / undecodable bytes / oversize text, and greedy streams
under request ids shared between clients, checked against fresh greedy runs recorded before the chaos. Every
`--kill-every` seconds the worker process (GetServerStats.worker_pid) gets SIGKILL; the server restarts it and
clients back off on UNAVAILABLE.

At the end (clients stopped, server idle a few seconds) it reports status codes per method and per action,
requests/s and tokens/s, reused-id mismatches, the server's stats before and after ResetPrefixCache (all usage
must be zero after it), server and worker RSS at start / after warm-up / end, worker restarts and the server's
own qnext_rpc_total / qnext_requests_total counters. Exit status 1 on a leak, a reused-id mismatch, or a server
that never became idle; 0 otherwise; 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.local_server import LocalServer  # noqa: E402
from bench.soak_probe import (counter_delta, disagreements, format_report, leaks, rss_kib,  # noqa: E402
                              scrape_metrics, server_stats, wait_idle)
from bench.soak_traffic import BASELINE_TOKENS, GREEDY, Tally, Traffic  # noqa: E402
from qnext.rpc.client import Client  # noqa: E402

NUM_BASELINES = 4
WARMUP_REQUESTS = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--minutes", type=float, default=10.0, help="how long the clients run")
    a("--streams", type=int, default=32, help="concurrent clients")
    a("--kill-every", type=float, default=120.0, help="seconds between worker SIGKILLs (0 = never)")
    a("--target", help="HOST:PORT of a running server (default: start one on the embedded default)")
    a("--metrics", help="HOST:PORT of --target's Prometheus endpoint (default: none; known when started here)")
    a("--server-pid", type=int, help="pid of --target's server process, for its RSS (default: not measured)")
    a("--device", help="--device for the server started here (default: the server's)")
    a("--server-args", default="", help="more qnext-serve flags for the server started here, one string "
      "(e.g. \"--num-speculative-tokens 2\": the MTP paths under the same chaos)")
    a("--seed", type=int, default=0)
    a("--out", type=Path, help="write the report as JSON here")
    a("--server-log", type=Path, help="the started server's stderr (default: discarded)")
    return p


async def record_baselines(traffic: Traffic) -> list[tuple[list[int], list[int]]]:
    """Greedy runs of a few prompts, one at a time, before any chaos: what a reused-id stream must equal."""
    rng = random.Random(traffic.seed)
    out = []
    for _ in range(NUM_BASELINES):
        prompt = traffic.random_ids(rng, rng.randint(8, 48))
        res = await traffic.client.generate(token_ids=prompt, max_new_tokens=BASELINE_TOKENS, timeout=60, **GREEDY)
        out.append((prompt, list(res.token_ids)))
    return out


async def warm_up(traffic: Traffic) -> None:
    """A few requests of each shape, so the RSS 'after warm-up' reading has the steady allocations in it."""
    rng = random.Random(traffic.seed + 1)
    await asyncio.gather(*[traffic.normal(rng) for _ in range(WARMUP_REQUESTS)])
    await traffic.bad(rng)
    traffic.tally = Tally()  # warm-up is not part of the counts


def rss_now(server_pid: int | None, worker_pid: int | None) -> dict[str, int | None]:
    return {"server": rss_kib(server_pid), "worker": rss_kib(worker_pid),
            "server_anon": rss_kib(server_pid, "RssAnon"), "worker_anon": rss_kib(worker_pid, "RssAnon")}


async def killer(client: Client, every: float, stop: asyncio.Event, kills: list[float], t0: float,
                 last_kill_s: float) -> None:
    """SIGKILL the current worker every `every` seconds until `last_kill_s`; the server must notice and start a
    new one. No kill near the end: the worker checked for leaks afterwards should have served chaos itself."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except asyncio.TimeoutError:
            pass
        if time.monotonic() - t0 > last_kill_s:
            continue
        s = await server_stats(client)
        pid = s["worker_pid"] if s else 0
        if not pid:
            continue  # still restarting from the last kill
        try:
            os.kill(pid, signal.SIGKILL)
            kills.append(round(time.monotonic() - t0, 1))
        except (ProcessLookupError, PermissionError) as e:  # a remote target, or it just died by itself
            print(f"soak: cannot kill worker {pid}: {e}", file=sys.stderr)


async def sample_rss(client: Client, server_pid: int | None, peak: dict[str, int], timeline: list[list],
                     stop: asyncio.Event) -> None:
    """Peak RSS over the run, and a timeline every 10 s (growth that levels off is first-touched cache pages,
    growth that does not is a leak); the worker pid is read each time since kills replace the process."""
    t0 = last = time.monotonic()
    while not stop.is_set():
        s = await server_stats(client)
        worker = s["worker_pid"] if s else None
        now = rss_now(server_pid, worker)
        for proc in ("server", "worker"):
            if now[proc] is not None:
                peak[proc] = max(peak.get(proc, 0), now[proc])
        if time.monotonic() - last >= 10 or not timeline:
            last = time.monotonic()
            timeline.append([round(last - t0), now["server"], now["worker"], worker])
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except asyncio.TimeoutError:
            pass


def progress_line(traffic: Traffic, t0: float, duration: float, kills: list[float]) -> str:
    t = traffic.tally
    errs = sum(n for cnt in t.by_method.values() for code, n in cnt.items() if code != "OK")
    return (f"soak: {time.monotonic() - t0:5.0f}/{duration:.0f} s  {t.requests_ok} ok  {errs} not OK  "
            f"{t.tokens} tokens  {sum(t.mismatches.values())} mismatches  {len(kills)} kills ")


async def chaos(traffic: Traffic, args: argparse.Namespace, server_pid: int | None) -> dict[str, Any]:
    """The clients, the killer and the RSS sampler for --minutes; returns what they measured."""
    duration = args.minutes * 60
    stop, done = asyncio.Event(), asyncio.Event()
    kills: list[float] = []
    peak: dict[str, int] = {}
    timeline: list[list] = []  # [s since start, server KiB, worker KiB, worker pid]
    t0 = time.monotonic()
    side = [asyncio.create_task(sample_rss(traffic.client, server_pid, peak, timeline, done))]
    if args.kill_every > 0:
        quiet_end = max(5.0, 0.2 * duration)
        side.append(asyncio.create_task(killer(traffic.client, args.kill_every, stop, kills, t0, duration - quiet_end)))
    clients = [asyncio.create_task(traffic.client_loop(i, stop)) for i in range(args.streams)]
    tty, shown = sys.stderr.isatty(), 0.0
    while (now := time.monotonic() - t0) < duration:
        await asyncio.sleep(min(1.0, duration - now))
        if tty or now - shown >= 30:  # a redrawn line on a terminal, a line every 30 s in a log
            shown = now
            line = progress_line(traffic, t0, duration, kills)
            sys.stderr.write("\r" + line if tty else line + "\n")
    stop.set()
    stopped = time.monotonic()
    # each finishes its current action; one still going after 10 s (a loaded machine) is cut, its stream cancelled
    _, late = await asyncio.wait(clients, timeout=10)
    for task in late:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    elapsed = time.monotonic() - t0
    done.set()
    await asyncio.gather(*side)
    sys.stderr.write(("\r" if tty else "") + progress_line(traffic, t0, duration, kills) + "\n")
    return {"elapsed": elapsed, "kills": kills, "peak": peak, "timeline": timeline,
            "phases_s": {"clients_finishing": round(time.monotonic() - stopped, 1)}}


async def finish(traffic: Traffic, server_pid: int | None) -> dict[str, Any]:
    """Wait for idle, read stats before and after ResetPrefixCache (fresh from the worker's reply), RSS."""
    client = traffic.client
    idle = await wait_idle(client, timeout_s=60, quiet_s=3)
    after = None
    if idle is not None:
        await client.reset_prefix_cache()
        after = await server_stats(client)
    end = after or idle or await server_stats(client) or {}
    return {"idle": idle, "after": after, "worker_pid": end.get("worker_pid"),
            "restarts": end.get("num_worker_restarts"), "rss": rss_now(server_pid, end.get("worker_pid"))}


def build_report(args: argparse.Namespace, target: str, traffic: Traffic, rss: dict[str, Any], run: dict[str, Any],
                 end: dict[str, Any], metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    t = traffic.tally
    rss.update(end=end["rss"], peak={p: run["peak"].get(p) for p in ("server", "worker")}, timeline=run["timeline"])
    rss["drift"] = {p: None if rss["end"][p] is None or rss["warm"][p] is None else rss["end"][p] - rss["warm"][p]
                    for p in rss["end"]}
    leaked = leaks(end["after"])
    failures = []
    if end["idle"] is None:
        failures.append("the server never became idle after the run")
    if leaked:
        failures.append(f"leaked after ResetPrefixCache: {leaked}")
    if t.mismatches.get("reused"):
        failures.append(f"{t.mismatches['reused']} reused-id streams differ from their fresh greedy run")
    elapsed = run["elapsed"]
    delta = counter_delta(metrics["warm"], metrics["end"])
    disagree = disagreements(t.by_method, delta) if metrics["end"] and "error" not in metrics["end"] else {}
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - elapsed)), "target": target,
        "duration_s": elapsed, "requests_per_s": t.requests_ok / elapsed, "tokens_per_s": t.tokens / elapsed,
        "traffic": {"by_method": {m: dict(c) for m, c in t.by_method.items()},
                    "by_action": {a: dict(c) for a, c in t.by_action.items()}, "requests_ok": t.requests_ok,
                    "tokens": t.tokens, "compared": dict(t.compared), "mismatches": dict(t.mismatches),
                    "mismatch_examples": t.mismatch_examples, "bad_unexpected": dict(t.bad_unexpected),
                    "bad_examples": t.bad_examples, "client_errors": dict(t.client_errors)},
        "reused_id_mismatches": t.mismatches.get("reused", 0),
        "worker_kills": len(run["kills"]), "kill_times_s": run["kills"], "worker_restarts": end["restarts"],
        "stats_idle": end["idle"], "stats_after_reset": end["after"], "leaks": leaked, "rss_kib": rss,
        "phases_s": run["phases_s"], "metrics": metrics["end"], "metrics_since_warmup": delta,
        "counter_disagreements": disagree,
        "failures": failures}


async def soak(args: argparse.Namespace, target: str, server_pid: int | None, metrics_at: str | None) -> dict:
    async with Client(target, timeout=60) as probe:
        await probe.wait_ready()
        info = await probe.model_info()
        s = await server_stats(probe)
    rss = {"start": rss_now(server_pid, s["worker_pid"] if s else None)}
    traffic = Traffic(target, info, [], args.seed)
    try:
        t = time.monotonic()
        traffic.baselines = await record_baselines(traffic)
        await warm_up(traffic)
        s = await server_stats(traffic.client)
        rss["warm"] = rss_now(server_pid, s["worker_pid"] if s else None)
        counters_warm = scrape_metrics(metrics_at)
        setup_s, t = time.monotonic() - t, time.monotonic()
        run = await chaos(traffic, args, server_pid)
        t = time.monotonic()
        end = await finish(traffic, server_pid)
        run["phases_s"].update(baselines_and_warmup=round(setup_s, 1),
                               idle_wait_and_reset=round(time.monotonic() - t, 1))
    finally:
        await traffic.close()
    metrics = {"end": scrape_metrics(metrics_at), "warm": counters_warm}
    return build_report(args, target, traffic, rss, run, end, metrics)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes <= 0 or args.streams < 1 or args.kill_every < 0:
        print("soak: --minutes must be > 0, --streams >= 1, --kill-every >= 0", file=sys.stderr)
        return 2
    server = None
    if args.target is None:
        # a small cache (256 MiB) so preemption and eviction happen too, not only the happy path
        extra = ["--max-num-seqs", str(max(8, args.streams)), "--max-model-len", "4096",
                 "--cache-memory", str(256 << 20),
                 *(["--device", args.device] if args.device else []), *shlex.split(args.server_args)]
        server = LocalServer(*extra, log_path=args.server_log)
        print(f"soak: {server.banner}", file=sys.stderr)
    target = server.target if server else args.target
    pid = server.proc.pid if server else args.server_pid
    metrics_at = f"127.0.0.1:{server.metrics_port}" if server and server.metrics_port > 0 else args.metrics
    try:
        report = asyncio.run(soak(args, target, pid, metrics_at))
    finally:
        if server:
            server.stop()
    print(format_report(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
