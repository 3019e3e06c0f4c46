"""Tokens/s through gRPC (16 concurrent streams) vs the in-process engine on the same requests, in one run.

    python bench/grpc_throughput.py [--model DIR] [--streams 16] [--max-new-tokens 16] [--prompt-tokens 16]

Greedy with ignore_eos, so both sides generate exactly streams * max_new_tokens tokens. Rounds alternate
gRPC and engine (never at the same time); the best round of each is compared. Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from qnext.rpc.client import Client  # noqa: E402
from test_service_support import ServerProcess  # noqa: E402
from qnext.worker.engine import Engine  # noqa: E402
from qnext.worker.types import EngineConfig, SamplingParams, StoppingParams

CACHE = 67108864


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(1000 + 37 * i + 11 * j) % 150000 for j in range(length)] for i in range(n)]


async def grpc_run(target: str, ps: list[list[int]], max_new: int) -> tuple[float, int]:
    async with Client(target) as c:
        await c.generate(token_ids=ps[0], temperature=0.0, max_new_tokens=2)  # warm-up

        async def one(p: list[int]) -> int:
            n = 0
            async for chunk in c.generate_stream(token_ids=p, temperature=0.0, max_new_tokens=max_new, ignore_eos=True):
                n += len(chunk.token_ids)
            return n
        start = time.perf_counter()
        counts = await asyncio.gather(*[one(p) for p in ps])
        return time.perf_counter() - start, sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.model is None:
        from qnext.worker.tiny import default_checkpoint
        args.model = str(default_checkpoint())
    ps = prompts(args.streams, args.prompt_tokens)
    engine = Engine(EngineConfig(model=args.model, device=args.device, cache_memory=CACHE, max_num_seqs=32,
                                 max_model_len=4096))
    engine.generate([ps[0]], SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=2))  # warm-up
    server = ServerProcess(Path(args.model), "--device", args.device)
    grpc_rates, engine_rates = [], []
    try:
        # Interleaved rounds (the idle server's worker blocks on its pipe while the engine runs): on a shared
        # machine the load drifts, so each side's best round is compared, and every round is printed.
        for _ in range(args.rounds):
            seconds, tokens = asyncio.run(grpc_run(server.target, ps, args.max_new_tokens))
            grpc_rates.append(tokens / seconds)
            start = time.perf_counter()
            out = engine.generate(ps, SamplingParams(temperature=0.0),
                                  StoppingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))
            engine_rates.append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - start))
    finally:
        server.stop()
    fmt = lambda rates: ", ".join(f"{r:.1f}" for r in rates)  # noqa: E731
    print(f"{args.streams} streams x {args.max_new_tokens} tokens, greedy, ignore_eos")
    print(f"gRPC tok/s per round:   {fmt(grpc_rates)}")
    print(f"engine tok/s per round: {fmt(engine_rates)}")
    print(f"ratio best gRPC / best engine = {max(grpc_rates) / max(engine_rates):.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
