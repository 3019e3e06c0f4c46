"""What constrained decoding costs (worker/grammar.py + the sampler's mask), measured in one process.

1. One batch-16 sampling step over the 151,936-token vocabulary: 16 JSON-schema-constrained rows (each matcher at
   a different point of a document) vs the same step with no constraint; the constrained step's parts are timed
   too: the 16 bitmasks (llguidance), their expansion to a [16, V] mask, the sampling itself.
2. The engine end to end on the embedded default checkpoint: 16 requests sampled with the checkpoint's defaults under the schema vs 16 free
   ones generating as many tokens each (ignore_eos, max_new_tokens = that request's constrained length).
Interleaved rounds, medians; tokens/s and ratios printed.

    python bench/grammar_mask.py            # --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

from qnext.worker.engine import Engine  # noqa: E402
from qnext.worker.grammar import GrammarCompiler  # noqa: E402
from qnext.worker.sampler import SamplingBatch, allowed_mask, sample  # noqa: E402
from qnext.worker.tiny import default_checkpoint  # noqa: E402
from qnext.worker.tokenizer_files import ENDOFTEXT_ID, IM_END_ID, VOCAB_SIZE  # noqa: E402
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999}, "kind": {"enum": ["cat", "dog", "bird"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "active": {"type": "boolean"}},
              "required": ["name", "active"], "additionalProperties": False}},
    "required": ["id", "kind", "owner"], "additionalProperties": False}
# Qwen3-Next's generation_config.json sampling (the server's defaults): top-k keeps the race to 20 columns
def sampling(seed: int) -> SamplingParams:
    return SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=seed)


DOC = '{"id": 42, "kind": "dog", "tags": ["abc", "de"], "owner": {"name": "Ann", "active": true}}'


def sampler_step(compiler: GrammarCompiler, grammar: str, rounds: int) -> dict[str, float]:
    """Median ms of one batch-16 step: free, constrained, and the constrained step's parts."""
    ids = compiler.tokenizer.tokenize_str(DOC)
    matchers = [compiler.matcher(grammar) for _ in range(16)]
    for i, m in enumerate(matchers):  # 16 different points of the document
        assert m.consume_tokens(ids[:i * len(ids) // 16])
    params = [sampling(i) for i in range(16)]
    logits = torch.randn(16, VOCAB_SIZE) * 4

    def batch(allowed: list[bytes] | None) -> SamplingBatch:
        return SamplingBatch.build(params, list(range(16)), [0] * 16, [None] * 16, [[]] * 16, VOCAB_SIZE,
                                   torch.device("cpu"), allowed=allowed)

    times: dict[str, list[float]] = {k: [] for k in ("free", "constrained", "bitmasks", "expand", "sample")}
    for _ in range(rounds + 1):  # the first round warms llguidance's caches and is dropped
        t0 = time.perf_counter()
        sample(logits, batch(None))
        t1 = time.perf_counter()
        masks = [m.compute_bitmask() for m in matchers]
        t2 = time.perf_counter()
        allowed_mask(masks, VOCAB_SIZE, torch.device("cpu"))
        t3 = time.perf_counter()
        sample(logits, batch(masks))
        t4 = time.perf_counter()
        for k, v in (("free", t1 - t0), ("bitmasks", t2 - t1), ("expand", t3 - t2), ("sample", t4 - t3),
                     ("constrained", t4 - t1)):
            times[k].append(v * 1e3)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def engine_run(engine: Engine, grammar: str | None, lengths: list[int] | None, seed: int) -> tuple[list[int], float]:
    """(each request's token count, tok/s) of 16 sampled requests."""
    prompt = [9707, 11, 1879, 0]
    for i in range(16):
        stop = StoppingParams(max_new_tokens=200) if lengths is None else \
            StoppingParams(max_new_tokens=lengths[i], ignore_eos=True)
        engine.add_request(GenerationRequest(f"r{seed}-{i}", prompt, sampling(seed + i),
                                             stop, grammar=grammar, use_prefix_cache=False))
    counts: dict[str, int] = {}
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
    wall = time.perf_counter() - start
    return [counts[f"r{seed}-{i}"] for i in range(16)], sum(counts.values()) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    ckpt = default_checkpoint()
    compiler = GrammarCompiler(ckpt / "tokenizer.json", VOCAB_SIZE, (IM_END_ID, ENDOFTEXT_ID))
    grammar = compiler.compile("response_format.json_schema", "json_schema", json.dumps(SCHEMA))
    step = sampler_step(compiler, grammar, args.rounds)
    print(f"batch-16 sampling step, medians of {args.rounds}: free {step['free']:.2f} ms, 16 constrained rows "
          f"{step['constrained']:.2f} ms ({step['constrained'] / step['free']:.2f}x) = bitmasks "
          f"{step['bitmasks']:.2f} + expand {step['expand']:.2f} + sample {step['sample']:.2f} ms")
    engine = Engine(EngineConfig(model=str(ckpt), seed=0))
    engine_run(engine, grammar, None, seed=10_000)  # warm-up
    rates = {"constrained": [], "free": []}
    for r in range(args.rounds):
        lengths, rate = engine_run(engine, grammar, None, seed=r * 100)
        rates["constrained"].append(rate)
        rates["free"].append(engine_run(engine, None, lengths, seed=r * 100)[1])
    c, f = statistics.median(rates["constrained"]), statistics.median(rates["free"])
    print(f"engine, 16 sampled requests (same token counts), medians of {args.rounds}: constrained {c:.1f} tok/s, "
          f"free {f:.1f} tok/s, ratio {c / f:.2f}x")
    print("rounds: " + "; ".join(f"{k} {', '.join(f'{x:.0f}' for x in v)}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
