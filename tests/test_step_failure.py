"""A step that raises fails only the request that caused it (worker/step_failure.py), in the engine itself:
the other requests of the failed step finish with exactly the tokens of a run without the fault (sampled and
with MTP too), nothing is leaked, a failure after the update ends that step's requests and empties the prefix
index (but a grammar refusing its request's tokens ends that request alone, and a drafting failure only drops
drafts), and a failure that keeps coming back (a broken device) or cannot be attributed is raised."""

from __future__ import annotations

import pytest
import torch

from qnext.worker.engine import Engine
from qnext.worker.scheduler import SchedulePlan
from qnext.worker.step_failure import MAX_CONSECUTIVE, StepFailures
from qnext.worker.types import EngineConfig, FinishReason, GenerationRequest, SamplingParams, StoppingParams

TRIGGER = 4242  # a token id only the culprit's prompt holds
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, TRIGGER, 24], [31, 32, 33], [41, 42, 43, 44, 45, 46]]
STOP = StoppingParams(max_new_tokens=12, ignore_eos=True)
SAMPLINGS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
             SamplingParams(temperature=0.9, top_p=0.9, seed=7), SamplingParams(temperature=0.7, seed=3)]


def make_engine(ckpt, **kw) -> Engine:
    return Engine(EngineConfig(model=str(ckpt), seed=0, cache_memory=64 << 20, **kw))


def fail_when_trigger(engine: Engine, error: type[Exception] = RuntimeError, where: str = "forward") -> list[int]:
    """Make the runner's `where` raise for any plan holding the trigger; returns a list that counts the raises."""
    raised: list[int] = []
    original = getattr(engine.runner, where)

    def failing(plan: SchedulePlan, *args):
        if any(TRIGGER in c.request.prompt_token_ids for c in plan.chunks):
            raised.append(len(plan.chunks))
            raise error("injected")
        return original(plan, *args)

    setattr(engine.runner, where, failing)
    return raised


def assert_clean(engine: Engine) -> None:
    assert not engine.has_unfinished()
    engine.reset_prefix_cache()
    assert engine.cache_manager.is_full() and engine.spec.num_tracked == 0


@pytest.mark.parametrize("k", [0, 2])
def test_the_culprit_fails_alone_and_the_rest_equal_a_clean_run(default_ckpt, k):
    # float32: with MTP the drafts a request verifies depend on its batch (adaptive lengths from step timings; on
    # a CPU in bf16, single-row draft passes use the int8 draft head), and in bf16 a verify chunk's rounding can
    # then move a greedy token (the failed run's batches differ from the clean run's: one token differed in bf16)
    kw = dict(num_speculative_tokens=k, dtype="float32")
    clean = make_engine(default_ckpt, **kw).generate(PROMPTS, SAMPLINGS, STOP)
    engine = make_engine(default_ckpt, **kw)
    raised = fail_when_trigger(engine)
    got = engine.generate(PROMPTS, SAMPLINGS, STOP)
    assert raised[0] == len(PROMPTS) and raised[-1] == 1  # failed in the shared step, then again alone
    for i, (c, ref) in enumerate(zip(got, clean)):
        if i == 1:
            assert c.finish_reason == FinishReason.ERROR and c.token_ids == []
        else:
            assert c.finish_reason == FinishReason.LENGTH and c.token_ids == ref.token_ids
    assert engine.failures.consecutive == 0  # later steps succeeded
    assert_clean(engine)


def test_out_of_memory_is_reported_as_such(default_ckpt):
    engine = make_engine(default_ckpt)
    fail_when_trigger(engine, torch.OutOfMemoryError)
    engine.add_request(GenerationRequest("culprit", PROMPTS[1], SAMPLINGS[1], STOP))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason, o.error.out_of_memory) for o in outs] == \
        [("culprit", FinishReason.ERROR, True)]
    assert "out of memory" in outs[0].error.message
    assert_clean(engine)


def test_a_failure_after_the_update_ends_the_steps_requests_and_empties_the_prefix_index(default_ckpt):
    engine = make_engine(default_ckpt)
    shared = [7] * 40  # a prefix the second round would find cached
    engine.generate([shared + [1]], SAMPLINGS[0], STOP)
    assert engine.stats().kv_blocks_cached > 0
    fail_when_trigger(engine, where="save_checkpoints")
    got = engine.generate([shared + [TRIGGER], shared + [3]], SAMPLINGS[:2], STOP)
    assert [c.finish_reason for c in got] == [FinishReason.ERROR, FinishReason.ERROR]  # both in that step
    assert engine.stats().kv_blocks_cached == 0
    # and the engine keeps serving, with the same tokens as a clean engine
    again = engine.generate([PROMPTS[0]], SAMPLINGS[0], STOP)
    assert again[0].token_ids == make_engine(default_ckpt).generate([PROMPTS[0]], SAMPLINGS[0], STOP)[0].token_ids
    assert_clean(engine)


def test_a_failure_that_keeps_coming_back_is_raised(default_ckpt):
    engine = make_engine(default_ckpt)

    def broken(plan, *args):
        raise RuntimeError("device broken")

    engine.runner.forward = broken
    with pytest.raises(RuntimeError, match="device broken"):
        engine.generate(PROMPTS, SAMPLINGS, STOP)
    assert engine.failures.consecutive == MAX_CONSECUTIVE


def test_unattributable_failures_are_raised():
    failures = StepFailures(attributable=False)  # tensor parallel: the other ranks may be inside a collective
    with pytest.raises(ValueError, match="x"):
        failures.fail(SchedulePlan(chunks=[], preempted=[]), scheduler=None, e=ValueError("x"), applied=False)


def test_a_grammar_that_refuses_its_tokens_ends_its_request_alone(default_ckpt):
    """In the update, a constrained request's grammar refusing the tokens it was sampled under (an engine or
    llguidance failure, never expected) used to end every request of the step: now it ends alone."""
    from qnext.worker.grammar import GrammarCompiler
    from qnext.worker.tokenizer_files import ENDOFTEXT_ID, IM_END_ID, VOCAB_SIZE
    compiler = GrammarCompiler(default_ckpt / "tokenizer.json", VOCAB_SIZE, (IM_END_ID, ENDOFTEXT_ID))
    grammar = compiler.compile("response_format.regex", "regex", "[a-z ]{1,200}")
    stop = StoppingParams(max_new_tokens=12)  # a constrained request may not ignore EOS
    clean = make_engine(default_ckpt).generate(PROMPTS, SAMPLINGS, STOP)
    engine = make_engine(default_ckpt)
    for i, (p, sp) in enumerate(zip(PROMPTS, SAMPLINGS)):
        engine.add_request(GenerationRequest(f"r{i}", p, sp, STOP))
    engine.add_request(GenerationRequest("constrained", [9707, 11, 1879], SamplingParams(temperature=0.0), stop,
                                         grammar=grammar))
    state = engine.scheduler._requests["constrained"].grammar
    accept, calls = state.accept, []

    def refusing(tokens):
        calls.append(tokens)
        if len(calls) == 3:
            raise RuntimeError("grammar: generated tokens refused: injected")
        accept(tokens)

    state.accept = refusing
    got: dict[str, list[int]] = {}
    finish: dict[str, tuple] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finish[o.request_id] = (o.finish_reason, o.error)
    reason, error = finish["constrained"]
    assert reason == FinishReason.ERROR and "injected" in error.message and len(got["constrained"]) == 3
    for i, ref in enumerate(clean):
        assert finish[f"r{i}"] == (FinishReason.LENGTH, None) and got[f"r{i}"] == ref.token_ids
    assert [f.request_ids for f in engine.failures.take()] == [["constrained"]]
    assert_clean(engine)


def test_a_drafting_failure_drops_the_drafts_and_nothing_else(default_ckpt):
    """MTP drafting runs after the update; its failure used to end every request of the step. Drafts are
    proposals: without them the requests decode, to the same tokens."""
    kw = dict(num_speculative_tokens=2, dtype="float32", speculative_draft_length="fixed")
    clean = make_engine(default_ckpt, **kw).generate(PROMPTS, SAMPLINGS, STOP)
    engine = make_engine(default_ckpt, **kw)
    draft, calls = engine.spec._draft, []

    def failing(*args):
        calls.append(1)
        if len(calls) in (2, 3):
            raise RuntimeError("injected drafting failure")
        return draft(*args)

    engine.spec._draft = failing
    got = engine.generate(PROMPTS, SAMPLINGS, STOP)
    assert len(calls) > 3
    assert [(c.finish_reason, c.token_ids) for c in got] == [(FinishReason.LENGTH, c.token_ids) for c in clean]
    failed = engine.failures.take()
    assert len(failed) == 2 and all(f.drafts_only and f.error is None and len(f.request_ids) == 4 for f in failed)
    assert_clean(engine)
