"""Checks of the hybrid prefix cache's state between engine steps, for tests/test_prefix_cache_fuzz.py:
`check_invariants` (the allocator's bookkeeping against what the scheduler's requests and the index's checkpoints
hold) and `KVProvenance` (a shadow of the KV pools: every row a running request computed came from its own tokens)."""

from __future__ import annotations

from collections import Counter

from qnext.worker.engine import Engine
from qnext.worker.scheduler import RequestStatus


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

        def forward_batch_spy(pieces, is_verify=None, **kw):
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
            return forward_batch(pieces, is_verify, **kw)

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
                # rows a request at draft length 0 has deferred (worker/spec_decode.py) are written later, at
                # the latest when their block is complete (a full block's rows are checked from then on)
                deferred = self.engine.spec._requests[r.request_id].deferred
                end = min(computed, r.num_tokens - 1) if deferred is None else deferred.first
                assert deferred is None or deferred.first // self.bs == (computed - 1) // self.bs, "deferred too long"
                for p in range(end):
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
