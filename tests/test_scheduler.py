"""The scheduler as a CPU state machine: fake "models" give the sampled tokens, no torch anywhere."""

import random
import subprocess
import sys
from collections.abc import Callable
from typing import Any
from pathlib import Path

import pytest

from qnext.worker.cache import HybridCacheManager
from qnext.worker.scheduler import Request, RequestStatus, SchedulePlan, Scheduler, SchedulerConfig, StepOutput
from qnext.worker.types import FinishReason, StoppingParams

EOS = 1
Model = Callable[[Request], int]


def hash_model(request: Request) -> int:
    """A deterministic "model": the next token is a pure function of all_token_ids, never EOS."""
    acc = 17
    for t in request.all_token_ids:
        acc = (acc * 1_000_003 + t) % 2_147_483_647
    return 10 + acc % 990


def make(rid: str, prompt_len: int, max_new: int = 4, priority: int = 0, **stopping: Any) -> Request:
    prompt = [100 + (sum(map(ord, rid)) + i) % 50 for i in range(prompt_len)]
    return Request(rid, prompt, StoppingParams(max_new_tokens=max_new, **stopping), eos_token_ids=(EOS,),
                   priority=priority)


def new(num_blocks: int = 64, block_size: int = 4, num_slots: int = 8, **config: int) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), HybridCacheManager(num_blocks, block_size, num_slots))


def check_plan(sched: Scheduler, plan: SchedulePlan) -> None:
    cfg = sched.config
    ids = [c.request.request_id for c in plan.chunks]
    assert len(ids) == len(set(ids)) <= cfg.max_num_seqs
    assert not set(ids) & set(plan.preempted)
    assert 0 < plan.num_batched_tokens <= cfg.max_num_batched_tokens or not sched.has_unfinished()
    for c in plan.chunks:
        r = c.request
        assert r.status == RequestStatus.RUNNING and c.start == r.num_computed_tokens and c.num_tokens >= 1
        assert c.sample == (c.start + c.num_tokens == r.num_tokens)
        assert len(r.block_ids) * sched.cache.block_size >= c.start + c.num_tokens and r.state_slot is not None


def check_invariants(sched: Scheduler) -> None:
    cache = sched.cache
    running, waiting = sched._running, list(sched._waiting)
    assert len(running) <= sched.config.max_num_seqs
    for queue in (running, waiting):  # both by (priority, arrival): FCFS within a priority
        keys = [(r.priority, r.arrival) for r in queue]
        assert keys == sorted(keys)
    assert {r.request_id for r in running + waiting} == set(sched._requests)
    for r in waiting:
        assert r.status == RequestStatus.WAITING and r.num_computed_tokens == 0
        assert r.block_ids == [] and r.state_slot is None
    for r in running:
        assert r.status == RequestStatus.RUNNING and r.state_slot is not None
        assert len(r.block_ids) * cache.block_size >= r.num_computed_tokens
    blocks = [b for r in running for b in r.block_ids]
    assert len(blocks) == len(set(blocks)) and len(blocks) + cache.blocks.num_free == cache.kv_blocks_total
    slots = [r.state_slot for r in running]
    assert len(slots) == len(set(slots)) and len(slots) + cache.slots.num_free == cache.state_slots_total


def step(sched: Scheduler, model: Model = hash_model) -> tuple[SchedulePlan, list[StepOutput]]:
    plan = sched.schedule()
    check_plan(sched, plan)
    check_invariants(sched)
    sampled = {c.request.request_id: model(c.request) for c in plan.chunks if c.sample}
    outs = sched.update(plan, sampled)
    check_invariants(sched)
    return plan, outs


def run(sched: Scheduler, model: Model = hash_model, max_steps: int = 10_000) -> dict[str, StepOutput]:
    """Step until done; returns each request's last output, with new_token_ids holding all its tokens."""
    done: dict[str, StepOutput] = {}
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            assert sched.cache.is_full()
            return done
        for o in step(sched, model)[1]:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                done[o.request_id] = StepOutput(o.request_id, tokens[o.request_id], True, o.finish_reason)
    raise AssertionError("did not finish")


def scripted(tokens: dict[str, list[int]]) -> Model:
    """A "model" that emits a fixed token sequence per request."""
    return lambda r: tokens[r.request_id][len(r.output_token_ids)]


def test_fcfs_order_and_max_num_seqs() -> None:
    sched = new(max_num_seqs=2)
    for rid in "abc":
        sched.add(make(rid, 3, max_new=2))
    plan, _ = step(sched)
    assert [c.request.request_id for c in plan.chunks] == ["a", "b"] and sched.num_waiting == 1
    plan, outs = step(sched)
    assert [c.request.request_id for c in plan.chunks] == ["a", "b"] and all(o.finished for o in outs)
    plan, _ = step(sched)
    assert [c.request.request_id for c in plan.chunks] == ["c"]
    assert set(run(sched)) == {"c"}


def test_token_budget_and_chunked_prefill_mix_with_decodes() -> None:
    sched = new(max_num_batched_tokens=8)
    sched.add(make("a", 3, max_new=10))
    sched.add(make("b", 20, max_new=2))
    shapes = []
    for _ in range(4):
        plan, _ = step(sched)
        shapes.append([(c.request.request_id, c.start, c.num_tokens, c.sample) for c in plan.chunks])
    assert shapes == [
        [("a", 0, 3, True), ("b", 0, 5, False)],
        [("a", 3, 1, True), ("b", 5, 7, False)],
        [("a", 4, 1, True), ("b", 12, 7, False)],
        [("a", 5, 1, True), ("b", 19, 1, True)],
    ]
    assert sched.get("b").status == RequestStatus.RUNNING  # type: ignore[union-attr]
    run(sched)


def test_waiting_request_is_strictly_fcfs() -> None:
    # "big" does not fit while "a" runs; "small" would, but must not jump ahead of it.
    sched = new(num_blocks=4, block_size=4)
    sched.add(make("a", 8, max_new=4))
    step(sched)
    sched.add(make("big", 12, max_new=1))
    sched.add(make("small", 1, max_new=1))
    for _ in range(3):
        plan, _ = step(sched)
        assert [c.request.request_id for c in plan.chunks] == ["a"] and not plan.preempted
    assert set(run(sched)) == {"big", "small"}


def test_stop_token_eos_and_length() -> None:
    sched = new()
    sched.add(make("stop", 2, max_new=9, stop_token_ids=(7,)))
    sched.add(make("eos", 2, max_new=9))
    sched.add(make("len", 2, max_new=3))
    sched.add(make("both", 2, max_new=9, stop_token_ids=(EOS,)))
    done = run(sched, scripted({"stop": [5, 7, 5], "eos": [5, 5, EOS], "len": [EOS - 1, 9, 9],
                                "both": [EOS]}))
    assert (done["stop"].new_token_ids, done["stop"].finish_reason) == ([5, 7], FinishReason.STOP_TOKEN)
    assert (done["eos"].new_token_ids, done["eos"].finish_reason) == ([5, 5, EOS], FinishReason.EOS)
    assert (done["len"].new_token_ids, done["len"].finish_reason) == ([0, 9, 9], FinishReason.LENGTH)
    assert done["both"].finish_reason == FinishReason.STOP_TOKEN  # stop ids are checked first


def test_min_new_tokens_and_ignore_eos() -> None:
    sched = new()
    a = make("min", 2, max_new=9, min_new_tokens=2, stop_token_ids=(7,))
    b = make("ignore", 2, max_new=3, ignore_eos=True, min_new_tokens=1, stop_token_ids=(7,))
    sched.add(a)
    sched.add(b)
    # While fewer than min_new_tokens outputs exist, eos and stop ids are suppressed (ignore_eos: stop ids only).
    assert a.suppressed_token_ids() == [EOS, 7] and b.suppressed_token_ids() == [7]
    # A (fake, unsuppressed) eos or stop id among the first min_new_tokens tokens does not stop.
    done = run(sched, scripted({"min": [EOS, 7, EOS], "ignore": [EOS, EOS, EOS]}))
    assert (done["min"].new_token_ids, done["min"].finish_reason) == ([EOS, 7, EOS], FinishReason.EOS)
    assert (done["ignore"].new_token_ids, done["ignore"].finish_reason) == ([EOS] * 3, FinishReason.LENGTH)
    c = make("after", 1, max_new=5, min_new_tokens=1)
    c.output_token_ids.append(5)
    assert c.suppressed_token_ids() == []


def test_max_model_len_finishes_with_length() -> None:
    sched = new(max_model_len=8)
    sched.add(make("a", 5, max_new=3))
    done = run(sched)
    assert len(done["a"].new_token_ids) == 3 and done["a"].finish_reason == FinishReason.LENGTH


def test_add_rejections_name_the_field() -> None:
    sched = new(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        sched.add(make("empty", 0))
    with pytest.raises(ValueError, match="max_new_tokens.*max_model_len"):
        sched.add(make("long", 30, max_new=3))
    with pytest.raises(ValueError, match="max_new_tokens.*KV blocks"):
        sched.add(make("huge", 16, max_new=2))  # 17 tokens of KV > 4 blocks of 4
    sched.add(make("fits", 16, max_new=1))  # the last sampled token needs no KV
    with pytest.raises(ValueError, match="request_id"):
        sched.add(make("fits", 1))
    assert sched.num_waiting == 1
    run(sched)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2, "min_new_tokens": 3}, "min_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
])
def test_stopping_params_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        StoppingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
def test_scheduler_config_validation(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: 0})


def test_abort_everywhere() -> None:
    sched = new(max_num_batched_tokens=4, max_num_seqs=2)
    for rid, n in [("run", 1), ("prefill", 10), ("wait", 2), ("between", 1)]:
        sched.add(make(rid, n, max_new=50))
    step(sched)  # run: prefill 1, prefill: chunk of 3; wait and between wait for a seat
    assert sched.get("prefill").num_computed_tokens == 3  # type: ignore[union-attr]
    assert sched.abort("wait") and sched.num_waiting == 1 and sched.get("wait") is None
    assert sched.abort("prefill") and sched.num_running == 1
    assert not sched.abort("prefill") and not sched.abort("unknown")
    step(sched)  # "between" is admitted beside "run"
    plan = sched.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["run", "between"]
    assert sched.abort("between")
    outs = sched.update(plan, {"run": 11, "between": 12})  # the aborted one is skipped silently
    assert [o.request_id for o in outs] == ["run"]
    assert sched.abort("run") and not sched.has_unfinished() and sched.cache.is_full()


def test_preemption_recomputes_and_matches_unconstrained_run() -> None:
    def workload() -> list[Request]:
        return [make(f"r{i}", 3 + 5 * i % 11, max_new=12 + i % 5) for i in range(6)]

    free = new(num_blocks=256, num_slots=8)
    for r in workload():
        free.add(r)
    expected = run(free)

    tight = new(num_blocks=10, block_size=4, num_slots=3, max_num_batched_tokens=16)
    requests = workload()
    for r in requests:
        tight.add(r)
    kept: dict[str, list[int]] = {}  # outputs of a preempted request at the time it was preempted
    num_preempted_with_outputs = 0
    for _ in range(1000):
        if not tight.has_unfinished():
            break
        plan = tight.schedule()
        check_plan(tight, plan)
        for c in plan.chunks:
            if c.request.request_id in kept:  # re-run from 0 over the prompt and the outputs kept so far
                assert c.start == 0 and c.request.output_token_ids == kept.pop(c.request.request_id)
        for rid in plan.preempted:
            r = tight.get(rid)
            assert r is not None and r.status == RequestStatus.WAITING and r.num_computed_tokens == 0
            kept[rid] = list(r.output_token_ids)
            num_preempted_with_outputs += bool(r.output_token_ids)
        tight.update(plan, {c.request.request_id: hash_model(c.request) for c in plan.chunks if c.sample})
        check_invariants(tight)
    assert not tight.has_unfinished() and tight.cache.is_full()
    assert num_preempted_with_outputs > 0 and not kept
    for r in requests:
        assert r.output_token_ids == expected[r.request_id].new_token_ids
        assert r.finish_reason == expected[r.request_id].finish_reason == FinishReason.LENGTH


def test_preempted_request_goes_to_the_front_and_latest_arrival_is_the_victim() -> None:
    sched = new(num_blocks=3, block_size=2, num_slots=4)
    sched.add(make("a", 2, max_new=4))
    sched.add(make("b", 2, max_new=4))
    sched.add(make("c", 2, max_new=4))
    plan, _ = step(sched)  # a, b, c each own 1 block holding 2 prompt tokens; no block is left
    assert len(plan.chunks) == 3 and sched.cache.blocks.num_free == 0
    plan, _ = step(sched)  # a needs a block for token 3: c (latest) goes; then b needs one: b itself goes
    assert plan.preempted == ["c", "b"] and [c.request.request_id for c in plan.chunks] == ["a"]
    assert [r.request_id for r in sched._waiting] == ["b", "c"]
    b = sched.get("b")
    assert b is not None and len(b.output_token_ids) == 1 and b.num_preemptions == 1
    run(sched)


def test_high_priority_is_admitted_ahead_of_a_queue_and_preempts_the_lowest() -> None:
    sched = new(max_num_seqs=2)
    for rid in ("a", "b"):
        sched.add(make(rid, 3, max_new=6))
    step(sched)
    for rid in ("l1", "l2", "l3"):
        sched.add(make(rid, 3, max_new=2))
    sched.add(make("h", 3, max_new=2, priority=-1))  # arrives last, most urgent
    plan, _ = step(sched)  # no sequence room: h preempts b, the last running request, and starts
    assert plan.preempted == ["b"] and [c.request.request_id for c in plan.chunks] == ["a", "h"]
    assert [r.request_id for r in sched._waiting] == ["b", "l1", "l2", "l3"]  # b keeps its place among equals
    order = []
    while sched.has_unfinished():
        plan, _ = step(sched)
        order += [rid for rid in plan.admitted if rid not in order]
    assert order == ["b", "l1", "l2", "l3"]


def test_equal_priorities_change_nothing_and_a_lower_one_is_the_victim() -> None:
    # as test_preempted_request_goes_to_the_front_and_latest_arrival_is_the_victim, but "a" (the first
    # arrival) has the lowest priority: it is the one preempted when "b" and "c" need blocks
    sched = new(num_blocks=3, block_size=2, num_slots=4)
    sched.add(make("a", 2, max_new=4, priority=5))
    sched.add(make("b", 2, max_new=4))
    sched.add(make("c", 2, max_new=4))
    plan, _ = step(sched)  # admitted by priority: b, c, then a
    assert plan.admitted == ["b", "c", "a"] and sched.cache.blocks.num_free == 0
    plan, _ = step(sched)  # b needs a block for token 3: a (lowest priority) goes; then c needs one: c goes
    assert plan.preempted == ["a", "c"] and [c.request.request_id for c in plan.chunks] == ["b"]
    assert [r.request_id for r in sched._waiting] == ["c", "a"]
    assert set(run(sched)) == {"a", "b", "c"}


def test_priority_outputs_equal_an_unconstrained_run() -> None:
    """Whatever order priorities impose (and the preemptions they cause), each request's tokens are its own."""
    def workload() -> list[Request]:
        return [make(f"r{i}", 3 + 5 * i % 11, max_new=8 + i % 5, priority=[3, 0, -2, 1][i % 4]) for i in range(10)]
    free = new(num_blocks=256, num_slots=16, max_num_seqs=16)
    for r in workload():
        free.add(r)
    expected = run(free)
    tight = new(num_blocks=12, block_size=4, num_slots=3, max_num_seqs=3, max_num_batched_tokens=16)
    requests = workload()
    for r in requests[:4]:
        tight.add(r)
    step(tight)
    for r in requests[4:]:
        tight.add(r)
    while tight.has_unfinished():
        step(tight)
    assert sum(r.num_preemptions for r in requests) > 0
    for r in requests:
        assert r.output_token_ids == expected[r.request_id].new_token_ids
    assert tight.cache.is_full()


def test_no_torch_imported() -> None:
    code = ("import sys; import worker.cache, worker.scheduler; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


@pytest.mark.parametrize("priorities", [(0,), (-1, 0, 0, 3)])
def test_randomized_stress(priorities: tuple[int, ...]) -> None:
    rng = random.Random(1234)
    sched = new(num_blocks=24, block_size=4, num_slots=5, max_num_seqs=4, max_num_batched_tokens=12,
                max_model_len=64)
    all_requests: list[Request] = []
    added = finished = aborted = 0
    for step_no in range(5000):
        if step_no < 450 and rng.random() < 0.3:
            n = rng.randint(1, 40)
            all_requests.append(make(f"q{added}", n, max_new=rng.randint(1, min(20, 64 - n)),
                                     priority=rng.choice(priorities), min_new_tokens=rng.choice([0, 0, 1]),
                                     stop_token_ids=(rng.randint(10, 999),)))
            sched.add(all_requests[-1])
            added += 1
        if sched.has_unfinished() and rng.random() < 0.05:
            assert sched.abort(rng.choice(list(sched._requests)))
            aborted += 1
        if not sched.has_unfinished():
            if step_no >= 450:
                break
            continue
        plan = sched.schedule()
        check_plan(sched, plan)
        check_invariants(sched)
        if plan.chunks and rng.random() < 0.05:  # abort between schedule and update
            assert sched.abort(rng.choice(plan.chunks).request.request_id)
            aborted += 1
        sampled = {c.request.request_id: hash_model(c.request) for c in plan.chunks if c.sample}
        finished += sum(o.finished for o in sched.update(plan, sampled))
        check_invariants(sched)
    assert not sched.has_unfinished() and sched.cache.is_full()
    assert finished + aborted == added and added > 100
    assert all(r.status == RequestStatus.FINISHED for r in all_requests)
    assert sum(r.num_preemptions for r in all_requests) > 0


def test_a_quarantined_request_runs_alone_behind_a_higher_priority_one() -> None:
    sched = new(max_num_seqs=4)
    for rid in ("a", "b"):
        sched.add(make(rid, 3, max_new=4))
    step(sched)
    sched.add(make("h", 3, max_new=2, priority=-1))  # waiting, ahead of everything by priority
    sched.quarantine([sched.get("a")])  # a step with "a" failed: it reruns alone
    assert [r.request_id for r in sched._waiting] == ["h", "a"]
    plan, _ = step(sched)
    assert [c.request.request_id for c in plan.chunks] == ["a"]
    assert set(run(sched)) == {"a", "b", "h"}
