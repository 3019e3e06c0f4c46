"""Hybrid prefix caching (worker/prefix_cache.py): hits at any position, exact outputs, eviction, no leaks.

Exactness is shown against the same engine with caching disabled (an independent path: every token is
recomputed from the prompt), in float64 so chunk boundaries cannot flip a greedy argmax through rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qnext.worker.cache import HybridCacheManager
from qnext.worker.engine import Engine
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams
from qnext.worker.prefix_cache import PrefixCache
from qnext.worker.scheduler import Request, Scheduler, SchedulerConfig
from qnext.worker.tiny import make_checkpoint, tiny_config

GREEDY = SamplingParams(temperature=0.0)
BLOCK = 16
SYSTEM_LEN = 40  # not a multiple of BLOCK: the hit must land mid-block


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("prefix_mtp"), tiny_config(vocab_size=512), seed=21,
                           tokenizer=False)


@pytest.fixture
def engines():
    made: list[Engine] = []

    def new(ckpt: Path, **kw) -> Engine:
        kw.setdefault("cache_memory", 64 << 20)
        made.append(Engine(EngineConfig(model=str(ckpt), seed=0, dtype="float64", state_dtype="float64",
                                        block_size=BLOCK, **kw)))
        return made[-1]

    yield new
    for e in made:  # all pools are full again once the cache is cleared
        assert not e.has_unfinished()
        e.reset_prefix_cache()
        assert e.cache_manager.is_full() and e.spec.num_tracked == 0
        if e.cache_manager.prefix is not None:
            assert e.cache_manager.prefix.num_checkpoints_used == 0


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (n,), generator=g).tolist()


def conversations(n: int) -> list[list[list[int]]]:
    """n conversations sharing one system prompt; each is its user turns' tokens."""
    return [[tokens(SYSTEM_LEN, 0) + tokens(9 + c, 100 + c)] + [tokens(5 + t + c, 200 + 10 * c + t) for t in (1, 2)]
            for c in range(n)]


class Recorder:
    """Runs turns to completion; keeps outputs, cached token counts and every MTP draft keyed by
    (request, tokens so far), the drafts being a function of the MTP head's KV cache."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.drafts: dict[tuple[str, int], list[int]] = {}

    def turn(self, rid: str, prompt: list[int], boundaries: list[int], max_new: int = 6, bypass: bool = False):
        e = self.engine
        e.add_request(GenerationRequest(rid, prompt, GREEDY, StoppingParams(max_new_tokens=max_new, ignore_eos=True),
                                        use_prefix_cache=not bypass, cache_checkpoints=tuple(boundaries)))
        out, cached = [], None
        while e.has_unfinished():
            for o in e.step():
                out += o.new_token_ids
                cached = o.num_cached_tokens
            r = e.scheduler.get(rid)
            if r is not None and r.draft_token_ids:
                self.drafts[(rid, r.num_tokens)] = list(r.draft_token_ids)
        return out, cached

    def conversation(self, cid: str, turns: list[list[int]]) -> list[tuple[list[int], int]]:
        """Turn t's prompt = every earlier turn and answer + its own turn; checkpoints at the turn boundaries
        (what the chat template reveals: end of the system prompt, end of each earlier answer)."""
        history, boundaries, results = [], [SYSTEM_LEN], []
        for t, user in enumerate(turns):
            prompt = history + user
            out, cached = self.turn(f"{cid}-t{t}", prompt, [b for b in boundaries if b <= len(prompt)])
            results.append((out, cached))
            history = prompt + out
            boundaries.append(len(history))
        return results


@pytest.mark.parametrize("k", [0, 2])
def test_multi_turn_outputs_identical_cold_warm_disabled(mtp_ckpt, engines, k, report):
    convs = conversations(2)
    # fixed draft lengths: the drafts are compared position by position below
    off = Recorder(engines(mtp_ckpt, enable_prefix_caching=False, num_speculative_tokens=k,
                           speculative_draft_length="fixed"))
    want = [off.conversation(f"c{i}", c) for i, c in enumerate(convs)]
    on = Recorder(engines(mtp_ckpt, num_speculative_tokens=k, speculative_draft_length="fixed"))
    cold = [on.conversation(f"c{i}", c) for i, c in enumerate(convs)]  # c0 cold, later ones share the system
    warm = [on.conversation(f"c{i}", c) for i, c in enumerate(convs)]  # every turn seen before
    for w, c, h in zip(want, cold, warm):
        assert [o for o, _ in c] == [o for o, _ in w] and [o for o, _ in h] == [o for o, _ in w]
    # hits: the shared 40-token system prompt (not a block multiple) and all of turn 1 in turn 2
    assert cold[0][0][1] == 0
    assert all(conv[0][1] >= SYSTEM_LEN for conv in cold[1:])
    for i, conv in enumerate(convs):
        turn1_len = len(conv[0]) + len(cold[i][0][0])
        assert cold[i][1][1] == turn1_len - 1  # everything but turn 1's last token, which was never computed
    assert all(cached > 0 for conv in warm for _, cached in conv)
    if k:  # the MTP head's KV after a hit equals the recomputed one: identical drafts at every position
        assert off.drafts and {key: d for key, d in on.drafts.items() if key in off.drafts} == off.drafts
    stats = on.engine.cache_manager.prefix.stats
    report(f"prefix cache k={k}", f"hit rate {stats.hit_tokens / stats.query_tokens:.2f} of prompt tokens, "
                                  f"{stats.num_hits}/{stats.num_queries} requests hit")


def test_concurrent_requests_and_bypass(mtp_ckpt, engines):
    """Requests sharing a system prompt admitted together (chunked prefill: no hits yet, each checkpoints the
    boundary), then a request that bypasses the cache sees no hit and the same prompt without bypass hits."""
    sys_prompt = tokens(SYSTEM_LEN, 0)
    ps = [sys_prompt + tokens(10 + i, 50 + i) for i in range(5)]
    stop = StoppingParams(max_new_tokens=5, ignore_eos=True)
    want = [c.token_ids for c in engines(mtp_ckpt, enable_prefix_caching=False).generate(ps, GREEDY, stop)]
    on = engines(mtp_ckpt, max_num_batched_tokens=64)
    for i, p in enumerate(ps[:4]):
        on.add_request(GenerationRequest(f"r{i}", p, GREEDY, stop, cache_checkpoints=(SYSTEM_LEN,)))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    while on.has_unfinished():
        for o in on.step():
            got[o.request_id] += o.new_token_ids
    assert list(got.values()) == want[:4]
    rec = Recorder(on)
    assert rec.turn("bypass", ps[4], [], max_new=5, bypass=True) == (want[4], 0)
    assert rec.turn("again", ps[4], [], max_new=5) == (want[4], SYSTEM_LEN)


def test_eviction_under_small_pools_keeps_outputs_exact(mtp_ckpt, engines):
    convs = conversations(4)
    off = Recorder(engines(mtp_ckpt, enable_prefix_caching=False, num_speculative_tokens=2))
    want = [off.conversation(f"c{i}", c) for i, c in enumerate(convs)]
    probe = engines(mtp_ckpt, num_speculative_tokens=2).cache_info
    small = engines(mtp_ckpt, num_checkpoints=3, num_speculative_tokens=2, max_num_seqs=2,
                    cache_memory=2 * probe.bytes_per_slot + 12 * probe.bytes_per_block + 3 * probe.bytes_per_checkpoint)
    assert small.cache_info.num_checkpoints == 3 and small.cache_info.num_blocks <= 14
    rec = Recorder(small)
    got = [rec.conversation(f"c{i}", c) for i, c in enumerate(convs)]
    assert [[o for o, _ in c] for c in got] == [[o for o, _ in c] for c in want]
    stats = small.cache_manager.prefix.stats
    assert stats.checkpoint_evictions > 0 and stats.block_evictions > 0 and stats.num_hits > 0


def test_preemption_with_prefix_caching_stays_exact(mtp_ckpt, engines):
    """A KV pool too small for the batch, with MTP: preemption by recompute while the cache evicts."""
    ps = [tokens(40 + 3 * i, 300 + i) for i in range(4)]
    stop = StoppingParams(max_new_tokens=24, ignore_eos=True)
    want = [c.token_ids for c in engines(mtp_ckpt, enable_prefix_caching=False).generate(ps, GREEDY, stop)]
    probe = engines(mtp_ckpt, num_speculative_tokens=2).cache_info
    tight = engines(mtp_ckpt, num_checkpoints=8, num_speculative_tokens=2, max_num_seqs=4,
                    cache_memory=4 * probe.bytes_per_slot + 12 * probe.bytes_per_block + 8 * probe.bytes_per_checkpoint)
    assert tight.cache_info.num_slots == 4 and tight.cache_info.num_checkpoints == 8
    assert tight.cache_info.num_blocks < sum(-(-(len(p) + 24) // BLOCK) for p in ps)
    got, preempted = {}, 0
    for i, p in enumerate(ps):
        tight.add_request(GenerationRequest(f"p{i}", p, GREEDY, stop))
    while tight.has_unfinished():
        for o in tight.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                preempted += o.num_preemptions
    assert [got[f"p{i}"] for i in range(4)] == want
    # the pressure that preempts also evicts (idle blocks, then checkpoints): what matters is exactness
    assert preempted > 0 and tight.cache_manager.prefix.stats.block_evictions > 0


# ---- the index alone (no torch) -------------------------------------------------------------------------------

def test_lookup_finds_the_deepest_checkpoint_with_its_blocks() -> None:
    pc = PrefixCache(block_size=4, num_checkpoints=4)
    seq = list(range(100, 111))  # 11 tokens
    n1, _ = pc.register_block(0, tuple(seq[0:4]), block=7)
    n2, _ = pc.register_block(n1, tuple(seq[4:8]), block=3)
    pc.add_checkpoint(n1, tuple(seq[4:6]), 6, tail_block=9)  # P = 6: one full block, tail of 2
    pc.add_checkpoint(n2, tuple(seq[8:10]), 10, tail_block=10)  # P = 10
    hit = pc.lookup(0, seq, limit=10)
    assert hit.position == 10 and hit.blocks == [7, 3] and hit.checkpoint.tail_block == 10
    assert pc.lookup(0, seq, limit=9).position == 6  # the deeper one would leave no token to compute
    other = seq[:5] + [0] + seq[6:]  # diverges at position 5: nothing at or before it
    assert pc.lookup(0, other, limit=10) is None
    assert pc.lookup(1, seq, limit=10) is None  # the other root (MTP) shares nothing
    pc.add_checkpoint(0, tuple(seq[0:3]), 3, tail_block=11)
    assert pc.lookup(0, other, limit=10).position == 3


def test_manager_shares_refcounts_and_evicts_idle_blocks_lru() -> None:
    cm = HybridCacheManager(num_blocks=6, block_size=2, num_slots=2, num_checkpoints=1)
    a = cm.allocate_blocks(3)
    parent = 0
    for i, b in enumerate(a):
        parent, registered = cm.prefix.register_block(parent, (i, i), b)
        assert registered
    cm.share_blocks(a[:2])  # a second sequence shares the first two
    cm.drop_blocks(a)  # the first sequence ends: a[2] becomes idle, a[:2] are still shared
    assert cm.prefix.num_idle_blocks == 1 and cm.kv_blocks_used == 2
    cm.drop_blocks(a[:2])
    assert cm.prefix.num_idle_blocks == 3 and cm.kv_blocks_used == 0
    got = cm.allocate_blocks(4)  # 3 free + the least recently used idle block: the deepest one, a[2]
    assert a[2] in got and not cm.prefix.is_cached(a[2]) and cm.prefix.is_cached(a[0])
    cm.drop_blocks(got)
    cm.clear_prefix_cache()
    assert cm.is_full() and cm.prefix.num_cached_blocks == 0


def test_scheduler_splits_prefill_at_checkpoint_positions() -> None:
    cm = HybridCacheManager(num_blocks=64, block_size=4, num_slots=2, num_checkpoints=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), cm)
    r = Request("r", list(range(30)), StoppingParams(max_new_tokens=2), (), checkpoint_positions=(7, 13))
    sched.add(r)
    lens = []
    while sched.has_unfinished():
        plan = sched.schedule()
        lens.append([c.num_tokens for c in plan.chunks])
        sched.update(plan, {"r": [1]} if plan.chunks[0].sample else {})
        assert [cp.checkpoint.position for cp in plan.checkpoints] == (
            [r.num_computed_tokens] if r.num_computed_tokens in (7, 13, 30) or r.finish_reason else [])
    assert lens == [[7], [6], [17], [1]]
    hit = cm.prefix.lookup(0, list(range(30)) + [5], limit=30)
    assert hit.position == 30  # the end-of-prompt checkpoint


def test_allocation_evicts_checkpoints_when_idle_blocks_run_out() -> None:
    cm = HybridCacheManager(num_blocks=3, block_size=2, num_slots=1, num_checkpoints=2)
    tails = [cm.allocate_checkpoint_block() for _ in range(2)]
    cm.prefix.add_checkpoint(0, (1,), 1, tails[0])
    cm.prefix.add_checkpoint(0, (2,), 1, tails[1])
    assert cm.kv_blocks_used == 0 and cm.kv_blocks_cached == 2 and cm.num_available_blocks == 3
    got = cm.allocate_blocks(2)  # the free block + the least recently used checkpoint's tail
    assert tails[0] in got and cm.prefix.num_checkpoints_used == 1 and cm.prefix.has_checkpoint(0, (2,))
    assert cm.prefix.stats.checkpoint_evictions == 1
    cm.drop_blocks(got)
    cm.clear_prefix_cache()
    assert cm.is_full() and cm.num_checkpoint_blocks == 0


def test_reset_while_running_keeps_serving_and_caching(mtp_ckpt, engines):
    """A reset mid-generation: the running request names its blocks in the index again, so a later request
    sharing its prompt hits, with exact outputs."""
    e = engines(mtp_ckpt)
    prompt = tokens(50, 7)
    stop = StoppingParams(max_new_tokens=6, ignore_eos=True)
    want = engines(mtp_ckpt, enable_prefix_caching=False).generate([prompt], GREEDY, stop)[0].token_ids
    e.add_request(GenerationRequest("first", prompt, GREEDY, stop, cache_checkpoints=(33,)))
    out = []
    for _ in range(3):
        out += [t for o in e.step() for t in o.new_token_ids]
    e.reset_prefix_cache()  # forgets everything, then the running request names its own blocks again
    assert e.cache_manager.prefix.num_checkpoints_used == 0 and e.cache_manager.prefix.num_idle_blocks == 0
    while e.has_unfinished():
        out += [t for o in e.step() for t in o.new_token_ids]
    assert out == want and e.cache_manager.prefix.num_cached_blocks > 0  # registered again after the reset
    # the next turn hits the first request's end-of-generation checkpoint, taken under its re-registered chain
    assert Recorder(e).turn("second", prompt + out + [1, 2], [], max_new=6)[1] == len(prompt) + len(out) - 1
