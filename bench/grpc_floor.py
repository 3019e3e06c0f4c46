"""The gRPC floor: what grpc-python itself costs to stream tokens, with no engine and none of our server code.

A bare `grpc.aio` server in its own process implements only `Generation.Generate`: every stream gets one
GenerateResponse (one token id, a two-character text: the shape of a decode step's message) per tick, all streams
on the same tick, like a batch's decode steps. The CPU seconds of that process and of the client per message are
the floor any Python gRPC server on this machine pays per streamed token; `grpc_throughput.py` sets our server's
own cost per token beside it.

    python bench/grpc_floor.py [--streams 16] [--tokens 64] [--tick-ms 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    """This process's own CPU seconds (not its children's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _serve(port_box: mp.Value, tick_s: float) -> None:  # the spawned server process
    import grpc
    from qnext.v1 import generation_pb2 as pb, generation_pb2_grpc as pbg

    async def main() -> None:
        tick = {"n": 0}
        ticked = asyncio.Condition()

        class Floor(pbg.GenerationServicer):
            async def Generate(self, request, context):  # noqa: N802 (the proto's name)
                first = tick["n"]
                for i in range(request.stopping.max_new_tokens):
                    async with ticked:
                        await ticked.wait_for(lambda: tick["n"] > first + i)
                    yield pb.GenerateResponse(token_ids=[1000 + i], text="ab")

        server = grpc.aio.server()
        pbg.add_GenerationServicer_to_server(Floor(), server)
        port_box.value = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        while True:
            await asyncio.sleep(tick_s)
            async with ticked:
                tick["n"] += 1
                ticked.notify_all()

    asyncio.run(main())


class FloorServer:
    """The bare server in a spawned process; `target` to connect, `pid` to read its CPU time."""

    def __init__(self, tick_s: float) -> None:
        ctx = mp.get_context("spawn")
        port = ctx.Value("i", 0)
        self.proc = ctx.Process(target=_serve, args=(port, tick_s), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 60
        while port.value == 0:
            if time.monotonic() > deadline or not self.proc.is_alive():
                raise RuntimeError("the floor server did not start")
            time.sleep(0.05)
        self.target, self.pid = f"127.0.0.1:{port.value}", self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(5)


async def stream_round(target: str, prompts: list[list[int]], max_new: int) -> tuple[float, int]:
    """Concurrent greedy Generate streams, one per prompt, through one channel: wall seconds from the first sent
    to the last finished, and the tokens received (our server and the floor alike; CPU is the caller's)."""
    from qnext.rpc.client import Client
    async with Client(target) as c:
        async def one(p: list[int]) -> int:
            n = 0
            async for chunk in c.generate_stream(token_ids=p, temperature=0.0, max_new_tokens=max_new,
                                                 ignore_eos=True):
                n += len(chunk.token_ids)
            return n
        start = time.perf_counter()
        counts = await asyncio.gather(*[one(p) for p in prompts])
        return time.perf_counter() - start, sum(counts)


def measure(server: FloorServer, streams: int, tokens: int) -> dict:
    """One round with the CPU microseconds per message of the bare server and of this (client) process."""
    s0, c0 = process_cpu_s(server.pid), self_cpu_s()
    seconds, n = asyncio.run(stream_round(server.target, [[1]] * streams, tokens))
    return {"seconds": seconds, "messages": n, "server_us_per_msg": (process_cpu_s(server.pid) - s0) / n * 1e6,
            "client_us_per_msg": (self_cpu_s() - c0) / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tick-ms", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = FloorServer(args.tick_ms / 1000)
    try:
        asyncio.run(stream_round(server.target, [[1]] * args.streams, 2))  # warm-up
        for _ in range(args.rounds):
            r = measure(server, args.streams, args.tokens)
            print(f"{r['messages']} messages in {r['seconds']:.2f} s: server {r['server_us_per_msg']:.0f} us, "
                  f"client {r['client_us_per_msg']:.0f} us of CPU per message")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
