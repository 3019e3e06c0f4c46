"""GenerateUnary's result as it is gathered (qnext_rpc/unary.py): the proto it makes is the one the chunks spell
out (built here independently, field by field), its size bound holds and is tight, it refuses as soon as the
bound passes the limit, and it keeps a token with 20 alternatives in a few hundred bytes, not ~2.9 KB."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

from qnext.rpc import convert
from qnext.rpc.stream import Chunk, Finish, Timings, TokenLogprob, Usage
from qnext.rpc.tool_calls import ToolCallDelta
from qnext.rpc.unary import ResultTooLarge, UnaryResult
from qnext.v1 import generation_pb2 as pb
from qnext.worker.types import LogprobEntries

VOCAB = 151936
PIECES = ["a", " the", "é", "漢字", "🙂", "\n", " x" * 7, ""]


def _f32(x: float) -> float:
    return float(np.float32(x))


def random_chunks(rng: random.Random, n: int, k: int, steps: int, prompt: list[int] | None) -> list[Chunk]:
    chunks = []
    for step in range(steps):
        for index in range(n):
            ids = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 1, 2, 3]))]
            c = Chunk("req-1", token_ids=ids, text="".join(rng.choice(PIECES) for _ in ids),
                      reasoning_text=rng.choice(["", "", "think"]), index=index)
            if k:
                c.logprobs = [TokenLogprob(t, _f32(-rng.random() * 9 - 1e-3),
                                           [(rng.randrange(1, VOCAB), _f32(-rng.random() * 9 - 1e-3))
                                            for _ in range(k)]) for t in ids]
            if step == 1 and index == n - 1:
                c.tool_calls = [ToolCallDelta(0, "call_1", "get_weather", '{"city": "Z'),
                                ToolCallDelta(0, "", "", 'ürich"}')]
            if step == 0 and prompt is not None:
                plp = LogprobEntries(k)
                for _ in prompt[1:]:
                    plp.append(_f32(-rng.random() * 5 - 1e-3),
                               [(rng.randrange(1, VOCAB), _f32(-rng.random() * 5 - 1e-3)) for _ in range(k)])
                c.prompt_logprobs, c.prompt_token_ids = plp, prompt
            if step == steps - 1:
                c.finish = Finish("stop_string", Usage(5, steps), Timings(1.0, 2.0, 3.0, 4.0, 0),
                                  stop_string="STOP ü")
            chunks.append(c)
    return chunks


def reference_result(chunks: list[Chunk], n: int) -> pb.GenerateResult:
    """What GenerateUnary returns for `chunks`, spelt out from the proto's field comments."""
    def sample(index: int) -> pb.GenerateResult:
        mine = [c for c in chunks if c.index == index]
        res = pb.GenerateResult(request_id="req-1", index=index)
        for c in mine:
            res.token_ids.extend(c.token_ids)
            res.logprobs.extend(pb.TokenLogprobs(token_id=t.token_id, logprob=t.logprob,
                                                 top=[pb.TopLogprob(token_id=i, logprob=lp) for i, lp in t.top])
                                for t in c.logprobs)
            if c.prompt_logprobs is not None:
                res.prompt_logprobs.extend(
                    pb.TokenLogprobs(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in top])
                    for t, (lp, top) in zip(c.prompt_token_ids[1:], c.prompt_logprobs))
            if c.finish is not None:
                res.finish.CopyFrom(convert.finish_info(c.finish))
        res.text = "".join(c.text for c in mine)
        res.reasoning_text = "".join(c.reasoning_text for c in mine)
        args = "".join(d.arguments_delta for c in mine for d in c.tool_calls)
        if args:
            res.tool_calls.add(id="call_1", name="get_weather", arguments_json=args)
        return res
    top = sample(0)
    if n > 1:
        top.choices.extend(sample(i) for i in range(n))
    return top


@pytest.mark.parametrize("n,k,prompt", [(1, 0, None), (1, 20, [7, 8, 9, 10]), (3, 5, [1, 2]), (4, 20, None)])
def test_the_result_is_what_the_chunks_spell_and_its_size_bound_is_tight(n, k, prompt):
    rng = random.Random(n * 100 + k)
    chunks = random_chunks(rng, n, k, steps=40, prompt=prompt)
    result = UnaryResult(top_logprobs=k, n=n, max_bytes=1 << 30)
    for c in chunks:
        result.add(c)
    got = convert.generate_result(result)
    assert got == reference_result(chunks, n)
    size = got.ByteSize()
    assert size <= result.bytes_bound() <= size * 1.1 + 200 * n  # per message a fixed allowance for FinishInfo


def test_it_refuses_as_soon_as_the_result_cannot_be_sent():
    rng = random.Random(1)
    chunks = random_chunks(rng, 2, 20, steps=200, prompt=None)
    limit = 64 << 10
    result = UnaryResult(top_logprobs=20, n=2, max_bytes=limit)
    with pytest.raises(ResultTooLarge, match=r"over the server's 0.0625 MiB message limit .* n=2 samples, "
                                             r"top_logprobs=20\): use Generate, which streams it, or lower "
                                             r"stopping.max_new_tokens, n, top_logprobs or prompt_logprobs"):
        for i, c in enumerate(chunks):
            result.add(c)
    # refused at the first chunk that took the bound over, no later: what came before fits
    before = UnaryResult(top_logprobs=20, n=2, max_bytes=1 << 30)
    for c in chunks[:i]:
        before.add(c)
    assert before.bytes_bound() <= limit < result.bytes_bound()
    assert convert.generate_result(before).ByteSize() <= limit


def test_a_token_with_20_alternatives_is_kept_in_a_few_hundred_bytes():
    """As the chunks came (TokenLogprob objects, a list per chunk) it was ~2.9 KB a token."""
    rng = random.Random(2)
    chunks = random_chunks(rng, 1, 20, steps=4000, prompt=None)
    tokens = sum(len(c.token_ids) for c in chunks)
    tracemalloc.start()
    result = UnaryResult(top_logprobs=20, n=1, max_bytes=1 << 30)
    for c in chunks:
        result.add(c)
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert kept / tokens < 400, f"{kept / tokens:.0f} bytes a token"
