"""The soak's server side (bench/soak.py): start the server, look at it (GetServerStats, /proc RSS, Prometheus
metrics), decide what leaked, and print the report."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from qnext.rpc.client import Client

# After ResetPrefixCache on an idle server every one of these must be zero: anything else is held by nobody.
LEAK_FIELDS = ("num_pending", "num_running", "num_waiting", "kv_blocks_used", "state_slots_used", "checkpoints_used",
               "kv_blocks_cached")


def rss_kib(pid: int | None, field: str = "VmRSS") -> int | None:
    """A /proc/<pid>/status memory line of a local process in KiB (VmRSS; RssAnon = without file-backed pages,
    which the kernel may drop under pressure and which so blur a leak); None when it is not readable (remote
    target, process gone)."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def stats_dict(msg: Any) -> dict[str, Any]:
    """Every ServerStats field, zero ones included (MessageToDict would drop them)."""
    return {f.name: round(v, 3) if isinstance(v := getattr(msg, f.name), float) else v
            for f in msg.DESCRIPTOR.fields}


async def server_stats(client: Client) -> dict[str, Any] | None:
    try:
        return stats_dict(await client.server_stats())
    except grpc.aio.AioRpcError:
        return None


async def wait_idle(client: Client, timeout_s: float, quiet_s: float) -> dict[str, Any] | None:
    """Poll until the worker is up and nothing is pending, running or waiting, then stay quiet for `quiet_s`
    (late aborts and the worker's last step land); returns the last stats (None: never idle in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = await server_stats(client)
        if s and s["worker_ready"] and not (s["num_pending"] or s["num_running"] or s["num_waiting"]):
            await asyncio.sleep(quiet_s)
            again = await server_stats(client)
            if again and again["worker_ready"] and not again["num_pending"]:
                return again
        await asyncio.sleep(0.5)
    return None


def leaks(after_reset: dict[str, Any] | None) -> dict[str, Any]:
    """Fields not back to zero after the reset on the idle server (a missing reading is a leak too: it could
    not be shown to be clean)."""
    if after_reset is None:
        return {"stats": "unavailable after the run"}
    return {k: after_reset[k] for k in LEAK_FIELDS if after_reset.get(k)}


def scrape_metrics(host_port: str | None) -> dict[str, float]:
    """The server's own request counters from its Prometheus endpoint: qnext_rpc_total{method,code} and
    qnext_requests_total{status} (the _created timestamps left out)."""
    if not host_port:
        return {}
    try:
        with urllib.request.urlopen(f"http://{host_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        return {"error": str(e)}
    out = {}
    for line in text.splitlines():
        if line.startswith(("qnext_rpc", "qnext_requests_total")) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if "_created" not in name:
                out[name] = float(value)
    return out


_RPC_LINE = re.compile(r'qnext_rpc_total\{code="(\w+)",method="(\w+)"\}')


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k != "error" and v != before.get(k, 0.0)}


def disagreements(by_method: dict[str, dict[str, int]], delta: dict[str, float]) -> dict[str, dict[str, int]]:
    """(method, code) pairs where the client's count differs from the server's qnext_rpc_total over the same
    period: an uncounted rejection, or a code the server logs differently from what the client got."""
    server: dict[tuple[str, str], int] = {}
    for key, v in delta.items():
        if m := _RPC_LINE.fullmatch(key):
            server[(m.group(2), m.group(1))] = int(v)
    client = {(method, code): n for method, codes in by_method.items() for code, n in codes.items()}
    keys = {k for k in {*client, *server} if k[0] in by_method}  # methods the clients called
    return {f"{m} {c}": {"client": client.get((m, c), 0), "server": server.get((m, c), 0)}
            for m, c in sorted(keys) if client.get((m, c), 0) != server.get((m, c), 0)}


def _codes(counter: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counter.items(), key=lambda kv: -kv[1]))


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
    c, t = r["config"], r["traffic"]
    lines = [f"== chaos soak: {r['duration_s']:.0f} s, {c['streams']} streams, kill every {c['kill_every']} s "
             f"({r['worker_kills']} kills, {r['worker_restarts']} restarts) against {r['target']}",
             f"  requests/s {r['requests_per_s']:.2f} (OK generations)   tokens/s {r['tokens_per_s']:.1f} "
             f"(received, any outcome)", "  status codes by method (client side):"]
    lines += [f"    {m:<14} {_codes(cnt)}" for m, cnt in sorted(t["by_method"].items())]
    lines.append("  by action:")
    lines += [f"    {a:<32} {_codes(cnt)}" for a, cnt in sorted(t["by_action"].items())]
    lines.append(f"  reused-id mismatches {t['mismatches'].get('reused', 0)} of {t['compared'].get('reused', 0)} "
                 f"compared; unique-id control {t['mismatches'].get('control', 0)} of "
                 f"{t['compared'].get('control', 0)}")
    lines += [f"    {e['action']} {e['request_id']}: want {e['want']} got {e['got']}"
              for e in t["mismatch_examples"][:3]]
    bad = t["bad_unexpected"]
    lines.append(f"  bad inputs not INVALID_ARGUMENT: {_codes(bad) if bad else 'none'}")
    lines += [f"    {k}: {v!r}" for k, v in list(t["bad_examples"].items())[:6]]
    if t["client_errors"]:
        lines.append(f"  the soak's own exceptions (not the server's fault): {t['client_errors']}")
    idle, after = r["stats_idle"] or {}, r["stats_after_reset"] or {}
    lines.append("  idle server, before -> after ResetPrefixCache: " + ", ".join(
        f"{k} {idle.get(k, '-')}->{after.get(k, '-')}" for k in (*LEAK_FIELDS, "kv_blocks_total",
                                                                "state_slots_total")))
    lines.append(f"  leaks: {r['leaks'] or 'none'}")
    rss = r["rss_kib"]
    for proc in ("server", "worker"):
        anon = f"{proc}_anon"
        lines.append(f"  {proc} RSS start {_mib(rss['start'][proc])}, after warm-up {_mib(rss['warm'][proc])}, "
                     f"end {_mib(rss['end'][proc])}, peak {_mib(rss['peak'][proc])}; drift since warm-up "
                     f"{_mib(rss['drift'][proc])} (anonymous memory {_mib(rss['warm'][anon])} -> "
                     f"{_mib(rss['end'][anon])}, drift {_mib(rss['drift'][anon])})"
                     + ("; not one process: kills replaced it" if proc == "worker" and r["worker_kills"] else ""))
    lines.append("  server counters since warm-up (Prometheus qnext_rpc_total, qnext_requests_total):")
    lines += [f"    {k} {v:g}" for k, v in sorted(r["metrics_since_warmup"].items())]
    lines.append("  client vs server counts that differ: " + (", ".join(
        f"{k} {v['client']} vs {v['server']}" for k, v in r["counter_disagreements"].items()) or "none"))
    lines.append("  time outside the run: " + ", ".join(f"{k} {v} s" for k, v in r["phases_s"].items()))
    lines.append(f"  RESULT: {'FAIL: ' + '; '.join(r['failures']) if r['failures'] else 'PASS'}")
    return "\n".join(lines)
