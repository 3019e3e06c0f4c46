"""The engine end to end on CPU: greedy parity with transformers' generate, batch invariance, chunked prefill,
preemption, seeds, stopping; the cache pools are full again after every test."""

from __future__ import annotations

import pytest
import torch

from hf_reference import make_hf_checkpoint
from qnext.worker.engine import Engine
from qnext.worker.types import EngineConfig, FinishReason, GenerationRequest, SamplingParams, StoppingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_ckpt")
    hf = make_hf_checkpoint(d, seed=1, full_attention_interval=2, num_hidden_layers=4)
    return d, hf


def make_engine(ckpt, **kw) -> Engine:
    kw.setdefault("cache_memory", 64 << 20)  # 64 MiB: thousands of tokens for this model, cheap to allocate
    return Engine(EngineConfig(model=str(ckpt[0]), seed=0, **kw))


@pytest.fixture
def engines():
    made: list[Engine] = []

    def new(ckpt, **kw) -> Engine:
        made.append(make_engine(ckpt, **kw))
        return made[-1]

    yield new
    for e in made:  # every block and state slot is back after any mix of finished / aborted / preempted
        assert not e.has_unfinished()
        e.reset_prefix_cache()  # cached prefixes hold blocks until cleared
        assert e.cache_manager.is_full() and e.spec.num_tracked == 0


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_transformers_generate(ckpt, engines):
    _, hf = ckpt
    ps = prompts([5, 12, 1, 30])
    ours = engines(ckpt).generate(ps, GREEDY, StoppingParams(max_new_tokens=32, ignore_eos=True))
    for p, c in zip(ps, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert c.token_ids == ref
        assert c.finish_reason == FinishReason.LENGTH


def run_staggered(engine: Engine, ps: list[list[int]], arrive_at: list[int], max_new: int = 16,
                  sampling: list[SamplingParams] | None = None) -> dict[str, list[int]]:
    """Requests join at the given step numbers; returns each request's tokens."""
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(ps))}
    step = 0
    pending = sorted(range(len(ps)), key=lambda i: arrive_at[i])
    while pending or engine.has_unfinished():
        while pending and arrive_at[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(GenerationRequest(f"r{i}", ps[i], sampling[i] if sampling else GREEDY,
                                                 StoppingParams(max_new_tokens=max_new, ignore_eos=True)))
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        step += 1
    return out


def test_batch_invariance_and_chunked_prefill(ckpt, engines):
    ps = prompts([3, 40, 9, 17, 1, 25, 70, 6], seed=1)
    alone = [engines(ckpt).generate([p], GREEDY, StoppingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids
             for p in ps]
    mixed = run_staggered(engines(ckpt), ps, arrive_at=[0, 0, 1, 2, 2, 3, 5, 8])
    assert [mixed[f"r{i}"] for i in range(8)] == alone
    chunked = run_staggered(engines(ckpt, max_num_batched_tokens=7), ps, arrive_at=[0] * 8)
    assert [chunked[f"r{i}"] for i in range(8)] == alone


def test_preemption_under_a_tiny_cache(ckpt, engines):
    ps = prompts([30, 22, 41, 15, 9, 33], seed=2)
    want = engines(ckpt).generate(ps, GREEDY, StoppingParams(max_new_tokens=24, ignore_eos=True))
    small = engines(ckpt, block_size=4)
    # room for ~3 sequences' worth of KV blocks: forces preemption by recompute
    per_block, per_slot = small.cache_info.bytes_per_block, small.cache_info.bytes_per_slot
    per_ckpt = small.cache_info.bytes_per_checkpoint  # prefix caching on, 2 checkpoints budgeted on top
    tiny = engines(ckpt, block_size=4, max_num_seqs=6, num_checkpoints=2,
                   cache_memory=int(6 * per_slot + 45 * per_block + 2 * per_ckpt))
    assert tiny.cache_info.num_blocks < sum(len(p) + 24 for p in ps) // 4
    got = tiny.generate(ps, GREEDY, StoppingParams(max_new_tokens=24, ignore_eos=True))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    del small


def test_preemptions_are_counted(ckpt, engines):
    e0 = engines(ckpt, block_size=4)
    e = engines(ckpt, block_size=4, max_num_seqs=6, num_checkpoints=2,
                cache_memory=int(6 * e0.cache_info.bytes_per_slot + 30 * e0.cache_info.bytes_per_block
                                 + 2 * e0.cache_info.bytes_per_checkpoint))
    for i, p in enumerate(prompts([40, 40, 40], seed=3)):
        e.add_request(GenerationRequest(f"p{i}", p, GREEDY, StoppingParams(max_new_tokens=20, ignore_eos=True)))
    preempted = 0
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                preempted += o.num_preemptions
    assert preempted > 0


def test_seeds(ckpt, engines):
    ps = prompts([4, 9, 14], seed=4)
    sp = [SamplingParams(temperature=1.0, seed=123), SamplingParams(temperature=0.8, top_k=50, seed=9),
          SamplingParams(temperature=1.2, top_p=0.9, seed=77)]
    alone = [run_staggered(engines(ckpt), [p], [0], sampling=[s])["r0"] for p, s in zip(ps, sp)]
    together = run_staggered(engines(ckpt), ps, [0, 1, 2], sampling=sp)
    assert [together[f"r{i}"] for i in range(3)] == alone
    other = run_staggered(engines(ckpt), [ps[0]], [0], sampling=[SamplingParams(temperature=1.0, seed=124)])["r0"]
    assert other != alone[0]
    # no seed: the engine draws one per request, so two identical requests differ
    e = engines(ckpt)
    a, b = e.generate([ps[0], ps[0]], SamplingParams(temperature=1.0), StoppingParams(max_new_tokens=16))
    assert a.token_ids != b.token_ids


def test_stopping(ckpt, engines):
    e = engines(ckpt)
    p = prompts([10], seed=5)[0]
    free = e.generate([p], GREEDY, StoppingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    c = e.generate([p], GREEDY, StoppingParams(max_new_tokens=12, stop_token_ids=(stop_at,)))[0]
    assert c.token_ids == free[:first + 1] and c.finish_reason == FinishReason.STOP_TOKEN
    # min_new_tokens suppresses the stop id until reached: the output then differs from the free run there
    c = e.generate([p], GREEDY, StoppingParams(max_new_tokens=12, min_new_tokens=first + 2,
                                               stop_token_ids=(stop_at,)))[0]
    assert stop_at not in c.token_ids[:first + 2]
    c = e.generate([p], GREEDY, StoppingParams(max_new_tokens=3))[0]
    assert len(c.token_ids) == 3 and c.finish_reason == FinishReason.LENGTH


def test_eos_from_generation_config_and_ignore_eos(tmp_path, engines):
    d = tmp_path / "eos"
    make_hf_checkpoint(d, seed=1, full_attention_interval=2, num_hidden_layers=4)
    e0 = make_engine((d, None))
    p = prompts([8], seed=6)[0]
    free = e0.generate([p], GREEDY, StoppingParams(max_new_tokens=10, ignore_eos=True))[0].token_ids
    (d / "generation_config.json").write_text(f'{{"eos_token_id": [{free[2]}, 9999]}}')
    e = engines((d, None))
    assert e.runner.eos_token_ids == (free[2], 9999)
    c = e.generate([p], GREEDY, StoppingParams(max_new_tokens=10))[0]
    assert c.token_ids == free[:free.index(free[2]) + 1] and c.finish_reason == FinishReason.EOS
    c = e.generate([p], GREEDY, StoppingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert c.token_ids == free


def test_abort_frees_everything_at_any_point(ckpt, engines):
    e = engines(ckpt, max_num_batched_tokens=8)
    for i, p in enumerate(prompts([30, 5, 12], seed=7)):
        e.add_request(GenerationRequest(f"a{i}", p, GREEDY, StoppingParams(max_new_tokens=50, ignore_eos=True)))
    e.step()  # a0 mid-prefill
    assert e.abort("a0")
    e.step()
    e.step()
    assert e.abort("a1") and e.abort("a2") and not e.abort("nope")
    finals = [o for o in e.step() if o.finished]
    assert {o.request_id for o in finals} == {"a1", "a2"}
    assert all(o.finish_reason == FinishReason.ABORTED for o in finals)


def test_bad_requests_name_the_field(ckpt, engines):
    e = engines(ckpt)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        e.add_request(GenerationRequest("x", [], GREEDY))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        e.add_request(GenerationRequest("x", [512], GREEDY))
    with pytest.raises(ValueError, match="^logit_bias: ids must be < vocab_size 512"):
        e.add_request(GenerationRequest("x", [5], SamplingParams(temperature=0.0, logit_bias=((512, 1.0),))))
    assert not e.has_unfinished()  # nothing was queued


def test_high_priority_request_overtakes_a_queue_with_unchanged_tokens(ckpt, engines):
    """One sequence at a time: a late request of priority -1 preempts the running one and starts before the
    queue of priority-0 requests; every request's greedy tokens equal its run alone."""
    ps = prompts([6, 5, 7, 4, 8], seed=3)
    stop = StoppingParams(max_new_tokens=6, ignore_eos=True)
    alone = [engines(ckpt).generate([p], GREEDY, stop)[0].token_ids for p in ps]
    e = engines(ckpt, max_num_seqs=1)
    e.add_request(GenerationRequest("run", ps[0], GREEDY, stop))
    first, tokens, preemptions = [], {}, {}
    outputs = e.step()
    for i in (1, 2, 3):
        e.add_request(GenerationRequest(f"low{i}", ps[i], GREEDY, stop))
    e.add_request(GenerationRequest("high", ps[4], GREEDY, stop, priority=-1))
    while outputs:
        for o in outputs:
            if o.new_token_ids and o.request_id not in first:
                first.append(o.request_id)
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            preemptions[o.request_id] = o.num_preemptions
        outputs = e.step() if e.has_unfinished() else []
    assert first == ["run", "high", "low1", "low2", "low3"]
    assert [tokens[r] for r in ("run", "low1", "low2", "low3", "high")] == alone
    assert preemptions == {"run": 1, "high": 0, "low1": 0, "low2": 0, "low3": 0}  # high preempted run once
    with pytest.raises(ValueError, match="^priority: must be a 32-bit int"):
        e.add_request(GenerationRequest("x", [5], GREEDY, stop, priority=2**31))
