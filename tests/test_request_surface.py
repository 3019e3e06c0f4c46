"""Request features of the engine checked against independent references: prompt log-probs against transformers'
log-softmax over the prompt, and the reasoning budget (a forced `</think>`) against runs without it, with and
without MTP speculation (issue: request surface)."""

from __future__ import annotations

import pytest
import torch

from hf_reference import make_hf_checkpoint
from qnext.worker.engine import Engine
from qnext.worker.sampler import SamplingBatch, sample
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams

THINK_END = 151668  # `</think>` in the real vocabulary (the embedded default's tokenizer)


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list]:
    """Every request to completion: its RequestOutputs in order."""
    for r in requests:
        engine.add_request(r)
    outs: dict[str, list] = {r.request_id: [] for r in requests}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
    return outs


def tokens(outputs: list) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


# ---- prompt log-probs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_plp")
    return d, make_hf_checkpoint(d, seed=3)


def test_prompt_logprobs_equal_transformers_log_softmax(hf_ckpt):
    """Chunked prefill (16-token chunks over a 45-token prompt, two requests in one batch): each prompt token's
    log-prob and top-3 equal transformers' log_softmax of its logits at the position before."""
    d, hf = hf_ckpt
    e = Engine(EngineConfig(model=str(d), dtype="float32", max_num_batched_tokens=16, cache_memory=64 << 20))
    prompts = {"a": [int(t) for t in torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(1))],
               "b": list(range(7, 30))}
    outs = run(e, [GenerationRequest(rid, p, SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=2),
                                     prompt_logprobs=3) for rid, p in prompts.items()])
    for rid, p in prompts.items():
        given = [o.prompt_logprobs for o in outs[rid] if o.prompt_logprobs is not None]
        assert len(given) == 1 and outs[rid][0].prompt_logprobs is not None  # once, with the first token
        got = given[0]
        assert len(got) == len(p) - 1
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0, :-1].double().log_softmax(-1)
        own = torch.tensor([lp for lp, _ in got], dtype=torch.float64)
        torch.testing.assert_close(own, want.gather(1, torch.tensor(p[1:])[:, None])[:, 0], atol=2e-4, rtol=0)
        top_v, top_i = want.topk(3, dim=-1)
        assert [[i for i, _ in top] for _, top in got] == top_i.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in top] for _, top in got], dtype=torch.float64),
                                   top_v, atol=2e-4, rtol=0)


def test_prompt_logprobs_bypass_the_prefix_cache_and_zero_gives_own_logprob_only(hf_ckpt):
    """A prompt the cache holds is still computed in full for a request with prompt log-probs (no position lacks
    one), and prompt_logprobs=0 gives each token's own log-prob with no alternatives."""
    d, _ = hf_ckpt
    e = Engine(EngineConfig(model=str(d), dtype="float32", cache_memory=64 << 20))
    p = list(range(40, 80))
    run(e, [GenerationRequest("warm", p, SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=2),
                              cache_checkpoints=(32,))])
    again = run(e, [GenerationRequest("hit", p, SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=2))])
    assert again["hit"][-1].num_cached_tokens > 0  # the cache does hold it
    outs = run(e, [GenerationRequest("plp", p, SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=2),
                                     prompt_logprobs=0)])["plp"]
    assert outs[-1].num_cached_tokens == 0
    got = outs[0].prompt_logprobs
    assert len(got) == len(p) - 1 and all(top == [] for _, top in got) and all(lp <= 0 for lp, _ in got)
    assert tokens(outs) == tokens(again["hit"])


def test_prompt_logprobs_survive_a_preemption_mid_prefill(hf_ckpt):
    """Preempted after two of its 16-token prefill chunks, the request recomputes its prompt from the start: the
    positions already scored are not scored again, so the log-probs equal an undisturbed run's, one per token."""
    d, _ = hf_ckpt
    p = [int(t) for t in torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(2))]

    def request(rid):
        return GenerationRequest(rid, p, SamplingParams(temperature=0.0), StoppingParams(max_new_tokens=2),
                                 prompt_logprobs=2)
    e = Engine(EngineConfig(model=str(d), dtype="float32", max_num_batched_tokens=16, cache_memory=64 << 20))
    want = run(e, [request("calm")])["calm"][0].prompt_logprobs
    e.add_request(request("moved"))
    e.step()
    e.step()
    moved = e.scheduler.get("moved")
    assert moved.num_computed_tokens == 32 and len(moved.prompt_logprob_values) == 32
    e.scheduler.quarantine([moved])  # preempted by recompute, as a failed step's requests are
    outs = []
    while e.has_unfinished():
        outs += e.step()
    got = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert moved.num_preemptions == 1 and len(got) == 1 and len(got[0]) == len(p) - 1
    assert [[i for i, _ in top] for _, top in got[0]] == [[i for i, _ in top] for _, top in want]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got[0]]), torch.tensor([lp for lp, _ in want]),
                               atol=1e-5, rtol=0)


def test_prompt_logprobs_out_of_range_is_refused(hf_ckpt):
    d, _ = hf_ckpt
    e = Engine(EngineConfig(model=str(d), dtype="float32", cache_memory=64 << 20))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        e.add_request(GenerationRequest("x", [1, 2, 3], prompt_logprobs=21))


# ---- reasoning budget ----------------------------------------------------------------------------------------


def test_a_forced_row_produces_its_token_greedy_or_sampled():
    """The sampler's forced rows (the reasoning budget's `</think>`): the one token whatever the logits, filters,
    bias or suppression say; free rows in the same batch are untouched."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=3),
              SamplingParams(temperature=0.7, logit_bias=((7, -100.0),)), SamplingParams(temperature=0.0)]
    for step in range(20):
        batch = SamplingBatch.build(params=params, seeds=[1, 2, 3, 4], steps=[step] * 4, histories=[None] * 4,
                                    suppressed_ids=[[], [], [], [7]], vocab_size=50,
                                    device=torch.device("cpu"), forced=[7, 7, 7, None])
        got = sample(logits, batch).token_ids.tolist()
        assert got[:3] == [7, 7, 7] and got[3] == int(logits[3].argmax())


def thinking_request(rid: str, budget: int | None, max_new: int = 20, **sampling) -> GenerationRequest:
    """A prompt that opened a think block (`<|im_start|>assistant\\n<think>\\n`); random weights never close it."""
    stopping = StoppingParams(max_new_tokens=max_new, ignore_eos=True, max_reasoning_tokens=budget,
                              reasoning_end_id=THINK_END if budget is not None else None)
    return GenerationRequest(rid, [151644, 77091, 198, 151667, 198], SamplingParams(**sampling), stopping)


@pytest.mark.parametrize("k", [0, 2])
def test_the_reasoning_budget_forces_think_end_then_the_answer_goes_on(default_ckpt, k):
    """Budget 6: tokens 0-5 as without a budget, token 6 is `</think>`, then generation goes on (20 in all).
    With MTP drafts (k = 2) the forced position is the same: drafts are drawn and verified under the same rule."""
    e = Engine(EngineConfig(model=str(default_ckpt), dtype="float32", seed=0, num_speculative_tokens=k,
                            speculative_draft_length="fixed", cache_memory=128 << 20))
    outs = run(e, [thinking_request("free", None, temperature=0.0), thinking_request("budget", 6, temperature=0.0),
                   thinking_request("zero", 0, temperature=0.0),
                   thinking_request("sampled", 6, temperature=1.0, seed=5)])
    free, budget = tokens(outs["free"]), tokens(outs["budget"])
    assert THINK_END not in free  # random weights do not close the block themselves
    assert budget[:6] == free[:6] and budget[6] == THINK_END and len(budget) == 20
    assert THINK_END not in budget[7:]
    assert tokens(outs["zero"])[0] == THINK_END
    sampled = tokens(outs["sampled"])
    assert sampled.index(THINK_END) == 6 and len(sampled) == 20


def test_the_budget_is_not_spent_when_the_output_closed_the_block_itself():
    from qnext.worker.scheduler import Request
    stopping = StoppingParams(max_new_tokens=20, max_reasoning_tokens=3, reasoning_end_id=9)
    r = Request("r", [1, 2], stopping, eos_token_ids=(0,))
    # tokens 0-2 are free, token 3 (after 3 generated or drafted ones) is `</think>` unless a draft closed it
    assert [r.forced_token_id(d) for d in ([], [5], [5, 6], [5, 6, 7], [5, 9, 7])] == [None, None, None, 9, None]
    r.output_token_ids = [5, 9, 4]  # closed at index 1
    assert r.forced_token_id([]) is None
    assert Request("r", [1], StoppingParams(max_new_tokens=5), eos_token_ids=(0,)).forced_token_id([]) is None
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        StoppingParams(max_reasoning_tokens=4)


# ---- parallel samples (n > 1) ----------------------------------------------------------------------------------

PROMPT = list(range(100, 141))  # 41 tokens: the prompt ends inside its third 16-token block (the forked copy)


def sample_tokens(outs: dict[str, list], rid: str) -> dict[int, list[int]]:
    by_index: dict[int, list[int]] = {}
    for o in outs[rid]:
        by_index.setdefault(o.index, []).extend(o.new_token_ids)
    return by_index


def fresh(ckpt, **kw) -> Engine:
    """bf16: its CPU path (prepacked oneDNN linears, the C token steps) gives a row the same numbers whatever the
    batch, which "sample i equals its seed alone" needs: fp32 linears go to MKL's sgemm, whose rows differ by an
    ulp between a 1-row and a 4-row call, and an inverse-CDF draw over 151,936 columns can turn on that."""
    return Engine(EngineConfig(model=str(ckpt), dtype="bfloat16", max_num_batched_tokens=16, cache_memory=128 << 20,
                               **kw))


@pytest.fixture(scope="module")
def alone(default_ckpt):
    """Seeds 7..10, each alone in an engine without a prefix cache: what sample i of seed 7 must equal."""
    e = fresh(default_ckpt, enable_prefix_caching=False)
    return {i: tokens(run(e, [GenerationRequest(f"s{i}", PROMPT, SamplingParams(temperature=1.0, seed=7 + i),
                                                StoppingParams(max_new_tokens=10))])[f"s{i}"]) for i in range(4)}


def test_n_samples_fork_one_prefill_and_each_equals_its_seed_alone(default_ckpt, alone):
    """n=4: the prompt is computed once (41 prompt tokens of work, not 164), sample i equals seed 7 + i run
    alone, the outputs name their sample, and every block and slot is free again after."""
    e = fresh(default_ckpt)
    outs = run(e, [GenerationRequest("a", PROMPT, SamplingParams(temperature=1.0, seed=7),
                                     StoppingParams(max_new_tokens=10), n=4)])
    assert e.scheduler.num_prompt_tokens_computed == len(PROMPT)
    assert sample_tokens(outs, "a") == alone
    assert sum(o.finished for o in outs["a"]) == 4 and {o.request_id for o in outs["a"]} == {"a"}
    e.reset_prefix_cache()
    assert e.cache_manager.is_full() and not e.has_unfinished()


def test_a_prompt_that_fills_its_last_block_forks_too(default_ckpt):
    """A 32-token prompt (two full 16-token blocks): the samples share both blocks and copy none. The fork used
    to index the parent's block past the prompt, which does not exist yet, and every sample ended in an error."""
    prompt = list(range(100, 132))
    e = fresh(default_ckpt, enable_prefix_caching=False)
    outs = run(e, [GenerationRequest("a", prompt, SamplingParams(temperature=1.0, seed=7),
                                     StoppingParams(max_new_tokens=6), n=3)])
    assert all(o.error is None for o in outs["a"])
    alone = {i: tokens(run(e, [GenerationRequest(f"s{i}", prompt, SamplingParams(temperature=1.0, seed=7 + i),
                                                 StoppingParams(max_new_tokens=6))])[f"s{i}"]) for i in range(3)}
    assert sample_tokens(outs, "a") == alone and all(len(t) == 6 for t in alone.values())
    assert e.cache_manager.is_full() and not e.has_unfinished()


def test_samples_without_room_prefill_themselves_with_the_same_tokens(default_ckpt, alone):
    """max_num_seqs 2: one sample forks, the other two queue and compute the prompt themselves: more prefill,
    the same tokens."""
    e = fresh(default_ckpt, max_num_seqs=2, enable_prefix_caching=False)
    outs = run(e, [GenerationRequest("a", PROMPT, SamplingParams(temperature=1.0, seed=7),
                                     StoppingParams(max_new_tokens=10), n=4)])
    assert sample_tokens(outs, "a") == alone
    assert e.scheduler.num_prompt_tokens_computed == 3 * len(PROMPT)
    assert e.cache_manager.is_full()


@pytest.mark.parametrize("k", [0, 2])
def test_a_preempted_sample_recomputes_its_own_sequence(default_ckpt, alone, k):
    """Sample 2 preempted after the fork drops its references to the shared prompt blocks and later recomputes
    prompt + its own tokens into blocks of its own: every sample still equals its seed alone (with MTP too)."""
    e = fresh(default_ckpt, enable_prefix_caching=False, num_speculative_tokens=k, speculative_draft_length="fixed")
    e.add_request(GenerationRequest("a", PROMPT, SamplingParams(temperature=1.0, seed=7),
                                    StoppingParams(max_new_tokens=10), n=4))
    outs: list = []
    while e.scheduler.get("a\x1f2") is None or len(e.scheduler.get("a\x1f2").output_token_ids) < 3:
        outs += e.step()
    sample = e.scheduler.get("a\x1f2")
    e.scheduler.quarantine([sample])
    while e.has_unfinished():
        outs += e.step()
    assert sample.num_preemptions == 1
    assert sample_tokens({"a": outs}, "a") == alone
    assert e.cache_manager.is_full() and e.spec.num_tracked == 0
    if k:
        assert e.spec.counters.num_drafted > 0


@pytest.mark.parametrize("k", [0, 2])  # samples speculate too: their MTP state goes with them
def test_aborts_end_every_sample_or_one_and_leak_nothing(default_ckpt, alone, k):
    e = fresh(default_ckpt, enable_prefix_caching=False, num_speculative_tokens=k, speculative_draft_length="fixed")
    req = lambda rid: GenerationRequest(rid, PROMPT, SamplingParams(temperature=1.0, seed=7),  # noqa: E731
                                        StoppingParams(max_new_tokens=10), n=4)
    # before the fork (the prompt is computed in 16-token chunks): the unforked samples end too
    e.add_request(req("early"))
    first = e.step()
    assert e.abort("early")
    ended = first + e.step()
    assert sorted(o.index for o in ended if o.finished) == [0, 1, 2, 3]
    # after the fork: one sample stopped, the others go on unchanged; then the whole request
    e.add_request(req("late"))
    outs: list = []
    while not any(o.index == 3 for o in outs):
        outs += e.step()
    assert e.abort("late", index=2)
    for _ in range(3):
        outs += e.step()
    assert e.abort("late")
    while e.has_unfinished():
        outs += e.step()
    got = {}
    for o in outs:
        got.setdefault(o.index, []).extend(o.new_token_ids)
    assert all(got[i] == alone[i][:len(got[i])] for i in range(4))
    assert len(got[2]) < len(got[0]) and sum(o.finished for o in outs) == 4
    assert e.cache_manager.is_full() and not e.has_unfinished() and e.spec.num_tracked == 0
    if k:
        assert e.spec.counters.num_drafted > 0


def test_a_parent_that_fails_before_its_prompt_is_done_ends_its_samples(default_ckpt, monkeypatch):
    """A step failure ending sample 0 before the fork (an injected one, worker/fault_injection.py: the step of
    the parent's first prompt chunk raises; aborts take every sample): the unforked samples end with the same
    reason and error, nothing is left open."""
    from qnext.worker.fault_injection import ENV, install_from_env
    from qnext.worker.types import FinishReason
    e = fresh(default_ckpt, enable_prefix_caching=False)
    monkeypatch.setenv(ENV, str(PROMPT[0]))
    install_from_env(e)
    e.add_request(GenerationRequest("a", PROMPT, SamplingParams(temperature=1.0, seed=7),
                                    StoppingParams(max_new_tokens=10), n=3))
    (parent,) = e.step()  # the first of the prompt's three chunks
    assert parent.index == 0 and parent.finish_reason == FinishReason.ERROR and parent.error is not None
    rest = e.step()
    assert [(o.index, o.finish_reason, o.error) for o in rest] == \
        [(1, FinishReason.ERROR, parent.error), (2, FinishReason.ERROR, parent.error)]
    assert not e.has_unfinished() and e.cache_manager.is_full()
    e.add_request(GenerationRequest("a", [1, 2], n=2))  # the id is free again


def test_n_and_request_ids_are_checked(default_ckpt):
    e = fresh(default_ckpt)
    with pytest.raises(ValueError, match="^n: "):
        e.add_request(GenerationRequest("x", [1, 2], n=17))
    with pytest.raises(ValueError, match="^request_id: "):
        e.add_request(GenerationRequest("x\x1f1", [1, 2]))
    e.add_request(GenerationRequest("x", [1, 2], n=2))
    with pytest.raises(ValueError, match="^request_id: "):
        e.add_request(GenerationRequest("x", [1, 2]))


def test_stop_token_ids_are_capped_and_named():
    """Every generated token is looked up in a request's stop ids and min_new_tokens suppresses them every step:
    at most MAX_STOP_TOKEN_IDS, and an error quotes a few bad ids, not the whole list."""
    from qnext.worker.types import MAX_STOP_TOKEN_IDS
    assert StoppingParams(stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS))).stop_ids == set(range(MAX_STOP_TOKEN_IDS))
    with pytest.raises(ValueError, match=r"^stop_token_ids: 1025 ids is over the limit of 1024$"):
        StoppingParams(stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS + 1)))
    with pytest.raises(ValueError, match=r"^stop_token_ids: token ids must be >= 0, got \[-1, -2, -3, -4, -5\]$"):
        StoppingParams(stop_token_ids=tuple(-i for i in range(1, 1000)))


def test_prompt_logprobs_cross_the_pipe_as_arrays_and_become_the_same_proto_entries():
    """The worker's LogprobEntries reads as (log-prob, [(id, log-prob)]) entries, pickles as bytes (a 16K-token
    prompt at 20 alternatives unpickled in 0.2 s as Python tuples, on the server's event loop), and the server's
    responses carry exactly those entries for prompt tokens 1.., streamed or unary."""
    import pickle
    import time as _time

    import numpy as np

    from qnext.rpc import convert
    from qnext.rpc.stream import Chunk
    from qnext.rpc.unary import UnaryResult
    from qnext.worker.types import LogprobEntries

    f32 = lambda x: float(np.float32(x))  # noqa: E731 - the arrays hold float32
    plp = LogprobEntries(2)
    plp.extend(np.array([-0.5, -1.25], np.float32).tobytes(), np.array([[3, 4], [5, 6]], np.int64).tobytes(),
               np.array([[-0.1, -0.2], [-0.3, -0.4]], np.float32).tobytes())
    want = [(-0.5, [(3, f32(-0.1)), (4, f32(-0.2))]), (-1.25, [(5, f32(-0.3)), (6, f32(-0.4))])]
    assert list(plp) == want and plp[-1] == want[1] and list(pickle.loads(pickle.dumps(plp))) == want
    chunk = Chunk("r", token_ids=[11], prompt_logprobs=plp, prompt_token_ids=[9, 7, 8])
    streamed = convert.generate_response(chunk).prompt_logprobs
    result = UnaryResult(top_logprobs=0, n=1, max_bytes=1 << 20)
    for c in (chunk, Chunk("r", token_ids=[12])):
        result.add(c)
    unary = convert.generate_result(result).prompt_logprobs
    for entries in (streamed, unary):
        assert [(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top]) for e in entries] == \
            [(t, lp, top) for t, (lp, top) in zip([7, 8], want)]
    big = LogprobEntries(20)
    rng = np.random.default_rng(0)
    big.extend(rng.random(16384, np.float32).tobytes(), rng.integers(0, 151936, (16384, 20)).tobytes(),
               rng.random((16384, 20), np.float32).tobytes())
    data = pickle.dumps(big, protocol=pickle.HIGHEST_PROTOCOL)
    start = _time.perf_counter()
    assert len(pickle.loads(data)) == 16384
    assert _time.perf_counter() - start < 0.05


def test_many_prompt_logprobs_stream_in_parts_that_concatenate_to_the_whole(monkeypatch):
    """More than PROMPT_LOGPROBS_PER_RESPONSE entries go out in responses of their own before the first token's,
    in order (a 262K-token prompt's at 20 alternatives were one ~60 MB message, over a default client's 4 MB)."""
    import numpy as np

    from qnext.rpc import convert, service
    from qnext.rpc.stream import Chunk
    from qnext.worker.types import LogprobEntries

    def entries(resps):
        return [(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top])
                for r in resps for e in r.prompt_logprobs]

    plp = LogprobEntries(2)
    plp.extend(np.arange(5, dtype=np.float32).tobytes(), np.arange(10, dtype=np.int64).tobytes(),
               np.arange(10, dtype=np.float32).tobytes())
    chunk = Chunk("r", token_ids=[42], text="x", index=1, prompt_logprobs=plp, prompt_token_ids=[9, 8, 7, 6, 5, 4])
    whole = convert.generate_response(chunk)
    assert service.split_prompt_logprobs(chunk) == [chunk]  # under the limit: as it was
    monkeypatch.setattr(service, "PROMPT_LOGPROBS_PER_RESPONSE", 2)
    parts = [convert.generate_response(c) for c in service.split_prompt_logprobs(chunk)]
    assert [len(r.prompt_logprobs) for r in parts] == [2, 2, 1] and all(r.index == 1 for r in parts)
    assert entries(parts) == entries([whole]) and [e[0] for e in entries(parts)] == [8, 7, 6, 5, 4]
    assert [list(r.token_ids) for r in parts] == [[], [], [42]] and parts[-1].text == "x"
