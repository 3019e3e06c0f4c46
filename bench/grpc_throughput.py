"""Tokens/s through gRPC (16 concurrent streams) vs the in-process engine on the same requests, in one run.

    python bench/grpc_throughput.py [--model DIR] [--streams 16] [--max-new-tokens 16] [--prompt-tokens 16]

Greedy with ignore_eos, so both sides generate exactly streams * max_new_tokens tokens. Rounds alternate
engine, gRPC and the bare gRPC floor (bench/grpc_floor.py, paced at the engine's step time; never two at once);
the medians are compared (the best rounds too). Target: ratio >= 0.95.

On a machine whose cores the engine already fills, every CPU second the server and the client spend is taken
from the engine, so the CPU each spends per streamed token is printed beside the floor's: the part of the
server's above the floor is ours, the floor is grpc-python's (server and client) per message; and the ratio
that CPU alone allows (with the floor's, and with ours) beside the measured one.

--split-cores models a deployment whose engine does not share its cores with the service (a GPU worker, a host with
cores to spare): the engine runs on one core with one thread (the in-process rounds and the server's worker
alike), the server process, the client and the floor on another. The ratio then is the service path's own cost,
not the CPU it takes from an engine that fills every core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.grpc_floor import (FloorServer, measure as floor_measure, process_cpu_s, self_cpu_s,  # noqa: E402
                              stream_round)
from test_service_support import ServerProcess  # noqa: E402
from qnext.worker.engine import Engine  # noqa: E402
from qnext.worker.types import EngineConfig, SamplingParams, StoppingParams

CACHE = 67108864


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(1000 + 37 * i + 11 * j) % 150000 for j in range(length)] for i in range(n)]


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (the server and its worker)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return sum(process_cpu_s(p) for p in [pid, *map(int, kids)])


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` on `cpus` (sched_setaffinity moves one thread; threads made later inherit)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile


def split_server(server_pid: int, engine_core: int, service_core: int) -> None:
    """The server and its helpers on the service core, its worker (the spawned child that is not
    multiprocessing's resource tracker) on the engine core."""
    pin(server_pid, {service_core})
    kids = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True).stdout.split()
    workers = []
    for kid in map(int, kids):
        with open(f"/proc/{kid}/cmdline", "rb") as f:
            is_tracker = b"resource_tracker" in f.read()
        pin(kid, {service_core} if is_tracker else {engine_core})
        workers += [] if is_tracker else [kid]
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker process under the server, found {workers}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--split-cores", action="store_true",
                    help="engine / worker on core 0 with one thread, server + client + floor on core 1")
    ap.add_argument("--server-log", type=Path, default=None, help="the server's JSON log (default: discarded)")
    args = ap.parse_args()
    if args.split_cores and len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--split-cores needs two cores")
    engine_core, service_core = (sorted(os.sched_getaffinity(0)) * 2)[:2]  # used only with --split-cores
    threads = ("--cpu-threads", "1") if args.split_cores else ()
    if args.model is None:
        from qnext.worker.tiny import default_checkpoint
        args.model = str(default_checkpoint())
    ps = prompts(args.streams, args.prompt_tokens)
    if args.split_cores:
        pin(os.getpid(), {engine_core})
    engine = Engine(EngineConfig(model=args.model, device=args.device, cache_memory=CACHE, max_num_seqs=32,
                                 max_model_len=4096, cpu_threads=1 if args.split_cores else 0))
    engine.generate([ps[0]], SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=2))  # warm-up
    start = time.perf_counter()
    engine.generate(ps, SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=args.max_new_tokens,
                                                                        ignore_eos=True))
    step_s = (time.perf_counter() - start) / args.max_new_tokens  # the floor's tick: a decode step's time
    server = ServerProcess(Path(args.model), "--device", args.device, *threads, log_path=args.server_log)
    floor = FloorServer(step_s)
    if args.split_cores:
        split_server(server.proc.pid, engine_core, service_core)
        pin(floor.pid, {service_core})
    rates: dict[str, list[float]] = {"gRPC": [], "engine": [], "floor": []}
    cpu: dict[str, list[float]] = {"server": [], "worker": [], "client": [], "floor server": [], "floor client": []}
    try:
        asyncio.run(stream_round(server.target, ps[:1], 2))
        server_pid = server.proc.pid
        for _ in range(args.rounds):
            if args.split_cores:
                pin(os.getpid(), {service_core})  # the client
            c0, s0, t0 = self_cpu_s(), process_cpu_s(server_pid), process_tree_cpu_s(server_pid)
            seconds, tokens = asyncio.run(stream_round(server.target, ps, args.max_new_tokens))
            rates["gRPC"].append(tokens / seconds)
            server_s, tree_s = process_cpu_s(server_pid) - s0, process_tree_cpu_s(server_pid) - t0
            cpu["server"].append(server_s / tokens * 1e6)
            cpu["worker"].append((tree_s - server_s) / tokens * 1e6)
            cpu["client"].append((self_cpu_s() - c0) / tokens * 1e6)
            if args.split_cores:
                pin(os.getpid(), {engine_core})
            start = time.perf_counter()
            out = engine.generate(ps, SamplingParams(temperature=0.0),
                                  StoppingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))
            rates["engine"].append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - start))
            if args.split_cores:
                pin(os.getpid(), {service_core})
            f = floor_measure(floor, args.streams, args.max_new_tokens)
            rates["floor"].append(f["messages"] / f["seconds"])
            cpu["floor server"].append(f["server_us_per_msg"])
            cpu["floor client"].append(f["client_us_per_msg"])
    finally:
        server.stop()
        floor.stop()
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    med = statistics.median
    print(f"{args.streams} streams x {args.max_new_tokens} tokens, greedy, ignore_eos; decode step {step_s * 1e3:.1f} ms")
    for k in ("gRPC", "engine"):
        print(f"{k} tok/s per round: {fmt(rates[k])}")
    print(f"CPU microseconds per streamed token (median of rounds): our server {med(cpu['server']):.0f} "
          f"(the bare gRPC floor's server {med(cpu['floor server']):.0f}), client {med(cpu['client']):.0f} "
          f"(floor {med(cpu['floor client']):.0f}), worker {med(cpu['worker']):.0f}")
    print(f"ratio gRPC / engine: medians {med(rates['gRPC']) / med(rates['engine']):.3f}, "
          f"best rounds {max(rates['gRPC']) / max(rates['engine']):.3f} (target >= 0.95)")
    if not args.split_cores:
        # Where the engine fills every core, each CPU second of the server and the client is one the engine does
        # not get: at best (no other interference) the ratio is 1 / (1 + service CPU per token x engine tok/s /
        # cores). With grpc-python's own floor per message, that is what any Python gRPC server could reach here.
        cores, engine_rate = len(os.sched_getaffinity(0)), med(rates["engine"])
        bound = lambda us: 1.0 / (1.0 + us * 1e-6 * engine_rate / cores)  # noqa: E731
        floor_us, ours_us = med(cpu["floor server"]) + med(cpu["floor client"]), med(cpu["server"]) + med(cpu["client"])
        print(f"CPU-share bound of that ratio on {cores} shared cores: {bound(floor_us):.3f} with the bare gRPC "
              f"floor's CPU per token, {bound(ours_us):.3f} with our server's and client's")


if __name__ == "__main__":
    main()
