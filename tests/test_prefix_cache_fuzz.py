"""Randomized differential test of the hybrid prefix cache (worker/prefix_cache.py, worker/cache.py, the
scheduler's restore / index / checkpoint paths and the engine's device copies).

Each seed draws a small engine (block size 4 or 16, a handful of KV blocks and checkpoints, a tiny token budget
so prefill is chunked, few sequences so requests queue and get preempted) and a workload built to hit the
cache in awkward ways: shared prefixes with random extensions, exact repeats, prompts diverging mid-block,
strict prefixes of an earlier prompt + output, conversation continuations, random checkpoint offsets, random
MTP draft lengths, requests bypassing the cache, aborts, arrivals interleaved with steps, and the occasional
`reset_prefix_cache()` while requests run.

Oracle (float64, greedy, so chunk boundaries cannot flip an argmax): every request that was not aborted
produces exactly the tokens the same model produces with prefix caching off; an aborted one produced a prefix
of them. MTP drafts proposed at the same token sequence agree with the caching-off run's (greedy outputs cannot
show a wrong MTP KV row; drafts can). Between steps: the allocator's bookkeeping is checked against the
scheduler's (`check_invariants`), and a shadow of the KV pools (`KVProvenance`) checks that every row a running
request computed, target or MTP, shared or copied, was computed from that request's own tokens. After the run,
clearing the prefix cache gives every block, slot and checkpoint back.

CI runs a few seeds; QNEXT_FUZZ_SEEDS=N (or "a-b", or "a,b,c") runs more, QNEXT_FUZZ_BLOCK_SIZES="1,3,4,16"
draws other block sizes (default 4,16). Block size 1 puts a block boundary at every position, which is where the
MTP row bug fixed with `PrefixCache.chain_span` shows most (QNEXT_FUZZ_BLOCK_SIZES=1 QNEXT_FUZZ_SEEDS=8-8 caught it).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import qnext.worker.model_runner as runner_module
from qnext.worker.engine import Engine
from qnext.worker.types import EngineConfig, FinishReason, GenerationRequest, SamplingParams, StoppingParams
from qnext.worker.scheduler import RequestStatus
from qnext.worker.tiny import make_checkpoint, tiny_config

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 512
MAX_TOKENS = 48  # prompt + max_new tokens of any one request
MAX_SPEC = 2
BLOCK_SIZES = [int(b) for b in os.environ.get("QNEXT_FUZZ_BLOCK_SIZES", "4,16").split(",")]


def _seeds() -> list[int]:
    spec = os.environ.get("QNEXT_FUZZ_SEEDS", "")
    if not spec:
        return [3, 6]  # hits on block size 4 with drafts; preemption pressure with restores after preemption
    if "-" in spec:
        a, b = spec.split("-")
        return list(range(int(a), int(b) + 1))
    if "," in spec:
        return [int(s) for s in spec.split(",")]
    return list(range(int(spec)))


@pytest.fixture(scope="module")
def fuzz_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("prefix_fuzz"), tiny_config(vocab_size=VOCAB), seed=21,
                           tokenizer=False)


def _engine(ckpt: Path, sizes: tuple[int, int, int] | None = None, **kw) -> Engine:
    """sizes: exactly (KV blocks, state slots, checkpoints), in place of splitting a memory budget."""
    config = EngineConfig(model=str(ckpt), seed=0, dtype="float64", state_dtype="float64",
                          num_speculative_tokens=MAX_SPEC, **kw)
    if sizes is None:
        return Engine(config)
    split = runner_module.size_cache
    runner_module.size_cache = lambda *args, **kwargs: sizes
    try:
        return Engine(config)
    finally:
        runner_module.size_cache = split


class Oracle:
    """Greedy continuations with prefix caching off, memoised per prompt (one engine per block size), and the
    MTP drafts proposed along the way, keyed by the tokens so far: a draft is a function of the MTP head's KV
    cache, so a wrong MTP row restored from the prefix cache shows up there (greedy outputs cannot show it)."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.engines: dict[int, Engine] = {}
        self.memo: dict[tuple[int, ...], list[int]] = {}
        self.drafts: dict[tuple[int, ...], list[int]] = {}

    def engine(self, block_size: int) -> Engine:
        if block_size not in self.engines:
            self.engines[block_size] = _engine(self.ckpt, block_size=block_size, enable_prefix_caching=False,
                                               cache_memory=64 << 20)
        return self.engines[block_size]

    def compute(self, block_size: int, wants: dict[tuple[int, ...], int]) -> None:
        todo = {p: n for p, n in wants.items() if len(self.memo.get(p, ())) < n}
        if not todo:
            return
        e = self.engine(block_size)
        outs: dict[str, list[int]] = {}
        for i, (p, n) in enumerate(todo.items()):
            e.add_request(GenerationRequest(f"oracle-{len(self.memo)}-{i}", list(p), GREEDY,
                                            StoppingParams(max_new_tokens=n, ignore_eos=True)))
            outs[f"oracle-{len(self.memo)}-{i}"] = []
        while e.has_unfinished():
            for o in e.step():
                outs[o.request_id] += o.new_token_ids
            record_drafts(e, self.drafts)
        for p, out in zip(todo, outs.values()):
            self.memo[p] = out

    def expected(self, prompt: tuple[int, ...], max_new: int, stops: tuple[int, ...]) -> list[int]:
        out = self.memo[prompt][:max_new]
        for i, t in enumerate(out):
            if t in stops:
                return out[:i + 1]
        return out


def record_drafts(engine: Engine, into: dict[tuple[int, ...], list[int]]) -> None:
    for r in engine.scheduler._running:
        if r.draft_token_ids:
            into[tuple(r.all_token_ids)] = list(r.draft_token_ids)


@pytest.fixture(scope="module")
def oracle(fuzz_ckpt) -> Oracle:
    return Oracle(fuzz_ckpt)


class KVProvenance:
    """A shadow of the KV pools: for each (block, row), the tokens its content is a function of. A target row at
    position p depends on tokens [0, p]; an MTP row pairs the target's hidden state at p with token p+1, so it
    depends on tokens [0, p+1]. Fed by the engine's batches and block copies; `check` asserts that every row a
    running request has computed was computed from its own tokens, whoever wrote it (the request, a shared
    cached block's owner, a checkpoint's tail). Catches a wrong shared row whether or not it flips a token."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.bs = engine, engine.config.block_size
        self.target: dict[tuple[int, int], tuple[int, ...] | None] = {}
        self.mtp: dict[tuple[int, int], tuple[int, ...] | None] = {}
        self.drafting = False
        forward_batch, copy_blocks, propose = engine.runner.forward_batch, engine.runner.cache.copy_blocks, \
            engine.spec.propose

        def forward_batch_spy(pieces, is_verify=None):
            target = is_verify is not None  # the target forward passes a list; MTP passes None
            for r, start, toks in pieces:
                if target:  # rows start + j: tokens [0, start) + toks[:j + 1]
                    head = tuple(r.token_slice(0, start))
                    for j in range(len(toks)):
                        self.target[self._row(r, start + j)] = head + tuple(toks[:j + 1])
                else:  # MTP rows start + j pair the hidden state there with toks[j], the token after it
                    head = tuple(r.token_slice(0, start + 1))
                    for j in range(len(toks)):
                        self.mtp[self._row(r, start + j)] = None if self.drafting else head + tuple(toks[:j + 1])
            return forward_batch(pieces, is_verify)

        def copy_blocks_spy(src, dst):
            for shadow in (self.target, self.mtp):
                rows = [{o: shadow.get((b, o)) for o in range(self.bs)} for b in src]
                for b, got in zip(dst, rows):
                    for o, v in got.items():
                        shadow[(b, o)] = v
            return copy_blocks(src, dst)

        def propose_spy(drafting):
            self.drafting = True
            try:
                return propose(drafting)
            finally:
                self.drafting = False

        engine.runner.forward_batch, engine.runner.cache.copy_blocks, engine.spec.propose = \
            forward_batch_spy, copy_blocks_spy, propose_spy

    def _row(self, r, p: int) -> tuple[int, int]:
        return r.block_ids[p // self.bs], p % self.bs

    def check(self) -> None:
        for r in self.engine.scheduler._running:
            computed = min(r.num_computed_tokens, r.num_tokens)
            for p in range(computed):
                got = self.target.get(self._row(r, p))
                assert got == tuple(r.token_slice(0, p + 1)), f"{r.request_id}: target KV row {p} is {got}"
            if r.num_speculative_tokens:
                for p in range(min(computed, r.num_tokens - 1)):
                    got = self.mtp.get(self._row(r, p))
                    assert got == tuple(r.token_slice(0, p + 2)), f"{r.request_id}: MTP KV row {p} is {got}"


def check_invariants(engine: Engine) -> None:
    """The allocator's state is exactly what the scheduler's requests and the index's checkpoints reference."""
    cm, sched, pc = engine.cache_manager, engine.scheduler, engine.cache_manager.prefix
    bs, total = cm.block_size, cm.blocks.num_total
    running, waiting = list(sched._running), list(sched._waiting)
    assert len(running) <= engine.config.max_num_seqs
    for r in waiting:
        assert r.status == RequestStatus.WAITING
        assert not r.block_ids and r.state_slot is None and r.num_computed_tokens == 0 and not r.prefix_nodes
    refs: Counter[int] = Counter()
    for r in running:
        assert r.status == RequestStatus.RUNNING and r.state_slot is not None
        assert len(set(r.block_ids)) == len(r.block_ids), f"{r.request_id} lists a block twice: {r.block_ids}"
        assert len(r.block_ids) >= cm.blocks_for(r.num_computed_tokens)
        assert len(r.prefix_nodes) <= len(r.block_ids)
        assert 0 < r.num_computed_tokens <= r.num_tokens
        refs.update(r.block_ids)
    slots = [r.state_slot for r in running]
    assert len(set(slots)) == len(slots)
    assert cm.slots.num_free == cm.slots.num_total - len(running)
    free = {b for b in range(total) if cm.blocks._is_free[b]}
    assert len(free) == cm.blocks.num_free == len(cm.blocks._free)
    tails = [c.tail_block for c in pc._ckpts.values()] if pc else []
    assert len(set(tails)) == len(tails) == cm.num_checkpoint_blocks
    refs.update(tails)
    for b in range(total):
        assert cm._refs[b] == refs[b], f"block {b}: {cm._refs[b]} references counted, {refs[b]} held"
        if b in free:
            assert refs[b] == 0 and not (pc and pc.is_cached(b)), f"free block {b} is referenced or cached"
        elif refs[b] == 0:
            assert pc is not None and b in pc._idle, f"block {b} is neither free, referenced nor idle"
    assert cm.kv_blocks_used == len({b for r in running for b in r.block_ids})
    if pc is None:
        return
    for b in pc._idle:
        assert pc.is_cached(b) and refs[b] == 0
    for t in tails:
        assert not pc.is_cached(t) and refs[t] == 1, f"checkpoint tail block {t} is shared or cached"
    assert len(pc._nodes) == len(pc._node_of_block)
    by_id = {}
    for key, node in pc._nodes.items():
        assert node.key == key and pc._node_of_block[node.block] is node
        by_id[node.node_id] = node
    assert sorted(list(pc._free_ckpts) + list(pc._ckpts)) == list(range(pc.num_checkpoints))
    for cid, c in pc._ckpts.items():
        assert c.ckpt_id == cid and pc._ckpt_by_parent[c.parent][c.tail] is c
        assert c.position % bs == len(c.tail) % bs and 1 <= len(c.tail) <= bs
    assert sum(len(v) for v in pc._ckpt_by_parent.values()) == len(pc._ckpts)
    for r in running:  # a request's chain of index nodes names its own tokens (where the nodes still exist)
        parent = r.prefix_root
        for i, nid in enumerate(r.prefix_nodes):
            node = by_id.get(nid)
            if node is not None:
                span = pc.chain_span(r.prefix_root)  # with MTP, a block's key includes the token after it
                assert node.key == (parent, tuple(r.token_slice(i * bs, i * bs + span))), (r.request_id, i)
            parent = nid
        want = min(r.num_computed_tokens, r.num_tokens - 1) // bs if r.use_prefix_cache else 0
        assert len(r.prefix_nodes) == want, (r.request_id, r.prefix_nodes, r.num_computed_tokens, r.num_tokens)
    assert not any(s.restored for s in engine.spec._requests.values()), "a restored MTP row was never consumed"
    assert set(engine.spec._requests) <= set(sched._requests)


@dataclass
class Sent:
    rid: str
    prompt: tuple[int, ...]
    max_new: int
    stops: tuple[int, ...]
    k: int
    bypass: bool
    checkpoints: tuple[int, ...] = ()
    out: list[int] = field(default_factory=list)
    finished: FinishReason | None = None
    aborted: bool = False


class Workload:
    """Draws requests; later ones reuse earlier prompts and finished outputs."""

    def __init__(self, rng: random.Random, block_size: int, max_tokens: int, max_new: int) -> None:
        self.rng = rng
        self.max_new = max_new
        self.max_tokens = max_tokens  # prompt + max_new of one request (it must fit the KV pool alone)
        self.bs = block_size
        n = rng.randint(1, 3)
        self.bases = [self.toks(rng.randint(max(1, block_size - 2), min(36, 2 * block_size + 8))) for _ in range(n)]
        self.prompts: list[Sent] = []
        self.done: list[Sent] = []  # finished, not aborted
        self.seen_outputs: list[int] = []
        self.count = 0
        self.ks = rng.choice([[0], [2], [0, 1, 2]])  # draft lengths (roots: with MTP or without)

    def toks(self, n: int) -> list[int]:
        return [self.rng.randrange(VOCAB) for _ in range(n)]

    def prompt(self) -> tuple[list[int], str, list[int], Sent | None]:
        rng, bs = self.rng, self.bs
        src = None  # the earlier request this prompt is derived from
        kinds = ["ext", "ext"]
        if self.prompts:
            kinds += ["repeat", "diverge"]
        if self.done:
            kinds += ["prefix_of_output", "continue", "continue"]
        kind = rng.choice(kinds)
        boundaries = []  # a chat template's turn boundaries
        if kind == "ext":
            base = rng.choice(self.bases)
            p = list(base) + self.toks(rng.randint(0, 12))
            boundaries.append(len(base))
        elif kind == "repeat":
            src = rng.choice(self.prompts)
            p = list(src.prompt)
        elif kind == "diverge":
            src = rng.choice(self.prompts)
            cut = rng.randint(0, len(src.prompt))
            if rng.random() < 0.6:  # at a block boundary (the next token is outside the block), or just off it
                cut = min(len(src.prompt), max(0, (cut // bs) * bs + rng.choice([0, 0, -1, 1, bs - 1])))
            p = list(src.prompt[:cut]) + self.toks(rng.randint(1, 6))
        else:
            src = rng.choice(self.done)
            full = list(src.prompt) + src.out
            if kind == "prefix_of_output":
                p = full[:rng.randint(1, len(full))]
            else:
                p = full + self.toks(rng.randint(1, 8))
                boundaries.append(len(full))
        p = p[:self.max_tokens - 1]
        return p, kind, [b for b in boundaries if 1 <= b <= len(p) and rng.random() < 0.7], src

    def request(self) -> Sent:
        rng = self.rng
        p, kind, boundaries, src = self.prompt()
        max_new = rng.randint(1, min(self.max_new, self.max_tokens - len(p)))
        stops = ()
        if self.seen_outputs and rng.random() < 0.2:  # tokens the model does produce, so stops do happen
            stops = tuple(rng.sample(self.seen_outputs, min(2, len(self.seen_outputs))))
        self.count += 1
        offsets = [rng.randint(1, len(p)) for _ in range(rng.choice([0, 0, 1, 2]))]  # client-chosen offsets
        k, bypass = rng.choice(self.ks), rng.random() < 0.15
        if src is not None and rng.random() < 0.7:  # the same client again: same draft length, cache on
            k, bypass = src.k, False
        sent = Sent(f"q{self.count}-{kind}", tuple(p), max_new, stops, k=k, bypass=bypass,
                    checkpoints=tuple(boundaries + offsets))
        self.prompts.append(sent)
        return sent


def run_seed(seed: int, ckpt: Path, oracle: Oracle, num_requests: int | None = None) -> dict:
    rng = random.Random(seed)
    bs = rng.choice(BLOCK_SIZES)
    max_num_seqs = rng.choice([1, 2, 3, 4])
    num_ckpts = rng.choice([1, 4, 8, 16])
    # from less than one long request's worth (requests are cut to fit alone) to roomy
    num_blocks = -(-rng.choice([2, 3, 4, 5, 9]) * 16 // bs) + rng.choice([0, 1])
    pressure = rng.random() < 0.3  # many sequences on a pool that fits about one: preemption by recompute
    if pressure:
        max_num_seqs, num_blocks = 4, -(-3 * 16 // bs) + rng.choice([0, 1])
    config = dict(block_size=bs, max_num_seqs=max_num_seqs, max_num_batched_tokens=rng.choice([3, 5, 8, 16, 32]),
                  num_checkpoints=num_ckpts, num_blocks=num_blocks)
    engine = _engine(ckpt, sizes=(num_blocks, max_num_seqs, num_ckpts),
                     **{k: v for k, v in config.items() if k != "num_blocks"})
    provenance = KVProvenance(engine)
    assert engine.cache_info.num_checkpoints == num_ckpts and engine.cache_info.num_blocks == num_blocks
    max_tokens = min(MAX_TOKENS, engine.cache_info.num_blocks * bs)
    wl = Workload(rng, bs, max_tokens, max_new=16 if pressure else 8)
    n_total = num_requests or rng.randint(10, 16)
    sent: dict[str, Sent] = {}
    drafts: dict[tuple[int, ...], list[int]] = {}
    p_abort = rng.choice([0.0, 0.03, 0.1])
    p_reset = rng.choice([0.0, 0.0, 0.03])
    p_arrive = 0.9 if pressure else rng.choice([0.1, 0.3, 0.6])
    steps = preemptions = resets = 0

    def add_some():
        for _ in range(rng.randint(1, 3)):
            if len(sent) >= n_total:
                return
            s = wl.request()
            sent[s.rid] = s
            engine.add_request(GenerationRequest(s.rid, list(s.prompt), GREEDY,
                                                 StoppingParams(max_new_tokens=s.max_new, ignore_eos=True,
                                                                stop_token_ids=s.stops),
                                                 num_speculative_tokens=s.k, use_prefix_cache=not s.bypass,
                                                 cache_checkpoints=s.checkpoints))

    while len(sent) < n_total or engine.has_unfinished():
        if len(sent) < n_total and (not engine.has_unfinished() or rng.random() < p_arrive):
            add_some()
        for o in engine.step():
            s = sent[o.request_id]
            s.out += o.new_token_ids
            if o.finished:
                s.finished = o.finish_reason
                preemptions += o.num_preemptions
                if o.finish_reason != FinishReason.ABORTED:
                    wl.done.append(s)
                    wl.seen_outputs += s.out
        steps += 1
        record_drafts(engine, drafts)
        check_invariants(engine)
        provenance.check()
        assert steps < 2000, "no progress"
        live = [s for s in sent.values() if s.finished is None and not s.aborted]
        if live and rng.random() < p_abort:
            victim = rng.choice(live)
            victim.aborted = engine.abort(victim.rid)
            assert victim.aborted
            check_invariants(engine)
        if rng.random() < p_reset:
            engine.reset_prefix_cache()
            resets += 1
            check_invariants(engine)

    wants: dict[tuple[int, ...], int] = {}
    for s in sent.values():
        wants[s.prompt] = max(wants.get(s.prompt, 0), s.max_new)
    oracle.compute(bs, wants)
    for s in sent.values():
        want = oracle.expected(s.prompt, s.max_new, s.stops)
        if s.aborted:
            assert s.finished == FinishReason.ABORTED and s.out == want[:len(s.out)], (seed, config, s)
        else:
            assert s.out == want, (seed, config, s, want)
    common = [key for key in drafts if key in oracle.drafts]
    for key in common:  # a draft pass short of blocks stops early: a prefix
        assert drafts[key] == oracle.drafts[key][:len(drafts[key])], (seed, config, key, drafts[key])
    engine.reset_prefix_cache()
    check_invariants(engine)
    assert engine.cache_manager.is_full() and engine.cache_manager.prefix.num_checkpoints_used == 0
    assert engine.cache_manager.num_checkpoint_blocks == 0 and engine.cache_manager.prefix.num_cached_blocks == 0
    assert engine.spec.num_tracked == 0
    stats = engine.cache_manager.prefix.stats
    return dict(seed=seed, pressure=pressure, slots=engine.cache_info.num_slots, steps=steps, drafts_compared=f"{len(common)}/{len(drafts)}", requests=len(sent), aborted=sum(s.aborted for s in sent.values()),
                preemptions=preemptions, resets=resets, hits=stats.num_hits, restores=stats.num_restores,
                ckpt_evictions=stats.checkpoint_evictions, block_evictions=stats.block_evictions, **config)


@pytest.mark.parametrize("seed", _seeds())
def test_prefix_cache_differential_fuzz(seed, fuzz_ckpt, oracle, report):
    result = run_seed(seed, fuzz_ckpt, oracle)
    report(f"prefix fuzz seed {seed}", result)


# ---- directed cases the fuzz reaches only by luck ----------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 2])
def test_restore_from_a_checkpoint_evicted_by_its_own_admission(fuzz_ckpt, oracle, k):
    """The pool is exhausted when a hit is admitted: the fresh tail block it needs can only come from evicting
    the one checkpoint, the very one it restores from. Its tail block becomes the request's copy of it and its
    id is reused by a checkpoint taken in the same step; the restore (device copies, and the hidden state of the
    MTP row at P-1) happens at the start of the step, before either is overwritten."""
    e = _engine(fuzz_ckpt, sizes=(4, 2, 1), block_size=4, max_num_batched_tokens=16, max_num_seqs=2)
    stop1 = StoppingParams(max_new_tokens=1, ignore_eos=True)
    a = [5, 6, 7]
    b = list(range(100, 112))  # 12 tokens: the 3 blocks the checkpoint's tail leaves
    c = a + [8]
    plans = []
    schedule = e.scheduler.schedule

    def spy():
        plans.append(schedule())
        return plans[-1]

    e.scheduler.schedule = spy

    def run(*reqs):
        for r in reqs:
            e.add_request(r)
        out = {r.request_id: [] for r in reqs}
        while e.has_unfinished():
            for o in e.step():
                out[o.request_id] += o.new_token_ids
            check_invariants(e)
        return out

    run(GenerationRequest("a", a, GREEDY, stop1, num_speculative_tokens=k))  # checkpoint at P=3, root tail
    assert e.cache_manager.prefix.num_checkpoints_used == 1 and e.cache_manager.blocks.num_free == 3
    got = run(GenerationRequest("b", b, GREEDY, stop1, use_prefix_cache=False),
              GenerationRequest("c", c, GREEDY, StoppingParams(max_new_tokens=6, ignore_eos=True),
                                num_speculative_tokens=k))
    restores = [r for p in plans for r in p.restores if r.request_id == "c"]
    assert restores and restores[0].position == 3 and restores[0].dst_block == restores[0].tail_block
    oracle.compute(4, {tuple(b): 1, tuple(c): 6})
    assert got == {"b": oracle.memo[tuple(b)][:1], "c": oracle.memo[tuple(c)][:6]}
    e.reset_prefix_cache()
    assert e.cache_manager.is_full()


def _kv_rows(e: Engine, rid: str, n: int) -> list:
    """Every KV pool's (k, v) rows of positions [0, n) of a running request, target layers and MTP head."""
    r = e.scheduler.get(rid)
    bs = e.config.block_size
    idx = torch.tensor([r.block_ids[p // bs] for p in range(n)]), torch.tensor([p % bs for p in range(n)])
    return [(k[idx], v[idx]) for k, v in zip(e.runner.cache.k_cache, e.runner.cache.v_cache)]


def test_hit_through_a_block_cached_by_a_request_that_diverged_right_after_it(fuzz_ckpt, oracle):
    """The MTP KV row of a block's last position pairs it with the NEXT token, outside the block. A (8 shared
    tokens, then a...) caches blocks 0-1; C (same 8 tokens, then c...) computes its own copies, but the index
    keeps A's; C's checkpoint at 10 hangs under them. R (C's first 10 tokens, then its own) hits it: every KV row
    it gets from the cache, MTP rows included, must equal the ones computed without the cache."""
    x = list(range(10, 18))  # 8 tokens: 2 blocks of 4
    a, c = x + [40, 41, 42], x + [50, 51, 52, 53]
    r = c[:10] + [60, 61]
    stop = StoppingParams(max_new_tokens=3, ignore_eos=True)
    on = _engine(fuzz_ckpt, sizes=(32, 2, 8), block_size=4, num_checkpoints=8)
    off = oracle.engine(4)
    provenance = KVProvenance(on)
    for rid, p, cps in (("a", a, ()), ("c", c, (10,))):
        on.add_request(GenerationRequest(rid, p, GREEDY, stop, cache_checkpoints=cps))
        while on.has_unfinished():
            on.step()
    rows = []
    for e in (on, off):
        e.add_request(GenerationRequest("r", r, GREEDY, stop))
        e.step()
        check_invariants(e)
        if e is on:
            provenance.check()  # names the wrong row's tokens, where the comparison below only finds it
        rows.append(_kv_rows(e, "r", len(r)))
        while e.has_unfinished():
            e.step()
    assert on.cache_manager.prefix.stats.hit_tokens == 10  # R restored at 10: blocks 0-1 shared, 2 copied
    for layer, ((k_on, v_on), (k_off, v_off)) in enumerate(zip(*rows)):
        bad = [p for p in range(len(r)) if not (torch.allclose(k_on[p], k_off[p], atol=1e-9)
                                               and torch.allclose(v_on[p], v_off[p], atol=1e-9))]
        assert not bad, f"KV pool {layer}: rows {bad} differ from the recomputed ones"
