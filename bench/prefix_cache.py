"""Time to first token of each turn of multi-turn conversations, with the prefix cache on vs off, in one process.

A benchmark, not a test: it prints a table and always exits 0 (unless something crashes). Two engines on the
same checkpoint (the embedded default unless --model), one with prefix caching and one without. Each
conversation has a shared system prompt and --turns user turns; turn t's prompt is the whole conversation so far
(every earlier prompt and answer) plus a new user message, with checkpoints at the turn boundaries as the
service's chat path asks for them. The two engines run the same turn back to back (alternating which goes
first), so a busy neighbour slows both alike; medians over --conversations. TTFT here = the wall time from
add_request to the step that returns the turn's first token (no gRPC, no queueing behind other requests).
Greedy outputs of the two engines are compared turn by turn.

    python bench/prefix_cache.py --threads 1
    python bench/prefix_cache.py --system-len 1024 --turn-len 128 --turns 6 --out prefix.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .
from bench.provenance import git_state  # noqa: E402

import torch  # noqa: E402

from bench.bench_common import FIRST_SPECIAL_ID, write_json  # noqa: E402
from qnext.worker.engine import Engine  # noqa: E402
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams  # noqa: E402


def random_tokens(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, FIRST_SPECIAL_ID, (n,), generator=g).tolist()


def run_turn(engine: Engine, rid: str, prompt: list[int], boundaries: list[int], max_new: int) -> tuple[float, list[int], int]:
    """(TTFT seconds, output tokens, cached tokens) of one request run alone to completion."""
    start = time.perf_counter()
    engine.add_request(GenerationRequest(rid, prompt, SamplingParams(temperature=0.0),
                                         StoppingParams(max_new_tokens=max_new, ignore_eos=True),
                                         cache_checkpoints=tuple(boundaries)))
    ttft, out, cached = None, [], 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.new_token_ids and ttft is None:
                ttft = time.perf_counter() - start
            out += o.new_token_ids
            cached = o.num_cached_tokens
    return ttft, out, cached


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded tiny one)")
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=512, help="tokens of the shared system prompt")
    p.add_argument("--turn-len", type=int, default=64, help="tokens of each user message")
    p.add_argument("--max-new", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(model=args.model, seed=0, max_num_batched_tokens=8192)
    engines = {"off": Engine(EngineConfig(enable_prefix_caching=False, **common)),
               "on": Engine(EngineConfig(**common))}
    g = torch.Generator().manual_seed(0)
    system = random_tokens(args.system_len, g)
    ttft: dict[str, list[list[float]]] = {k: [[] for _ in range(args.turns)] for k in engines}
    cached: list[list[int]] = [[] for _ in range(args.turns)]
    prompt_lens: list[list[int]] = [[] for _ in range(args.turns)]
    same = True
    for c in range(args.conversations):
        history: list[int] = []
        boundaries = [len(system)]
        for t in range(args.turns):
            prompt = (history or system) + random_tokens(args.turn_len, g)
            order = ["off", "on"] if (c + t) % 2 == 0 else ["on", "off"]
            outs = {}
            for name in order:
                secs, outs[name], n_cached = run_turn(engines[name], f"c{c}t{t}", prompt, boundaries, args.max_new)
                ttft[name][t].append(secs)
                if name == "on":
                    cached[t].append(n_cached)
            same &= outs["on"] == outs["off"]
            prompt_lens[t].append(len(prompt))
            history = prompt + outs["off"]
            boundaries.append(len(history))
    print(f"prefix cache TTFT: {args.conversations} conversations x {args.turns} turns, system {args.system_len} "
          f"tokens, user turns {args.turn_len}, {args.max_new} new tokens per turn; medians")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT off ms':>12} {'TTFT on ms':>11} {'off/on':>7}")
    rows = []
    for t in range(args.turns):
        off, on = statistics.median(ttft["off"][t]) * 1e3, statistics.median(ttft["on"][t]) * 1e3
        row = dict(turn=t + 1, prompt_tokens=statistics.median(prompt_lens[t]), cached_tokens=statistics.median(cached[t]),
                   ttft_off_ms=off, ttft_on_ms=on, speedup=off / on)
        rows.append(row)
        print(f"{t + 1:>4} {row['prompt_tokens']:>7.0f} {row['cached_tokens']:>7.0f} {off:>12.1f} {on:>11.1f} "
              f"{off / on:>6.2f}x")
    print(f"greedy outputs identical with and without the cache: {same}")
    stats = engines["on"].cache_manager.prefix.stats
    print(f"hit rate {stats.hit_tokens / max(1, stats.query_tokens):.2f} of prompt tokens; checkpoints taken "
          f"{stats.checkpoints_taken}, evicted {stats.checkpoint_evictions}; KV blocks evicted {stats.block_evictions}")
    if args.out:
        write_json(Path(args.out), dict(args=vars(args), rows=rows, outputs_identical=same, git=git_state(),
                                        threads=torch.get_num_threads()), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
