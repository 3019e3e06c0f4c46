"""The prefix index of the hybrid cache: which KV blocks and which DeltaNet state checkpoints hold a token prefix.

A hit needs two things at the same position P:
- the attention KV of tokens [0, P): full blocks found by walking a chain of (parent node, block tokens) keys
  from the root, plus the rows of the block that holds token P-1;
- the DeltaNet conv + recurrent state after token P-1: a checkpoint, since those layers keep one state per
  sequence, not one per token.

A checkpoint at P is keyed by (node of the last full block before P-1's block, tokens of P-1's block up to P-1),
so P may be any position, not a multiple of the block size. It owns a private copy of P-1's block (the "tail
block"): on a hit, the request shares the full blocks before it (read only, reference counted) and gets a fresh
block the tail is copied into, because it will write the rows after P-1 there. The checkpoint also keeps the
target's final hidden state at P-1, so the MTP head's KV row at P-1 (which pairs that hidden state with token P,
a token the prefix does not fix) can be recomputed for the new request; every other MTP row of the prefix pairs
tokens inside the prefix. For the same reason a block of the MTP root's chain is keyed by its tokens AND the
token after it (`chain_span`): the MTP row of a block's last position pairs it with that next token, so two
requests that diverge right after a block hold different MTP rows in it and must not share it.

Keys compare token tuples, never hashes, so a hit is exact by construction. Node ids are never reused: a key
whose parent was evicted is unreachable (the walk starts at the root) and is evicted in its turn.
Two roots: requests that run the MTP head (its KV is written for every position) and those that do not (their
blocks hold no MTP KV); neither reuses the other's blocks.

Blocks: this index only names cached blocks; the reference counts and the free list are the allocator's
(`worker/cache.py`). A cached block nobody references is "idle": still a hit, evicted least recently used first
when the allocator needs blocks. Checkpoints live in their own fixed pool (ids index the device tensors of
`CacheTensors`), evicted least recently used first when a new one needs an id.

Plain Python, no torch.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

ROOTS = (0, 1)  # node ids of the empty prefix: 0 = requests without MTP, 1 = with MTP


@dataclass
class _Node:
    node_id: int
    block: int
    key: tuple[int, tuple[int, ...]]


@dataclass
class Checkpoint:
    ckpt_id: int  # index into CacheTensors' checkpoint tensors
    parent: int  # node id of the last full block before the tail (or a root)
    tail: tuple[int, ...]  # tokens of the tail block up to position P-1 (1..block_size of them)
    position: int  # P: the state is the one after token P-1
    tail_block: int  # private KV block holding the tail's rows (referenced by this checkpoint)


@dataclass(frozen=True)
class Hit:
    position: int  # P: tokens [0, P) come from the cache
    nodes: list[int]  # node ids of the shared full blocks, in order
    blocks: list[int]  # their block ids
    checkpoint: Checkpoint


@dataclass
class PrefixCacheStats:
    num_queries: int = 0  # requests looked up
    num_hits: int = 0
    query_tokens: int = 0  # prompt tokens of the requests looked up
    hit_tokens: int = 0  # of which served from the cache
    num_restores: int = 0  # admissions that started from a checkpoint (re-admissions after preemption too)
    checkpoints_taken: int = 0
    checkpoint_evictions: int = 0
    block_evictions: int = 0


class PrefixCache:
    def __init__(self, block_size: int, num_checkpoints: int) -> None:
        assert num_checkpoints >= 1, num_checkpoints
        self.block_size = block_size
        self.num_checkpoints = num_checkpoints
        self._nodes: dict[tuple[int, tuple[int, ...]], _Node] = {}
        self._node_of_block: dict[int, _Node] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference, oldest first
        self._next_node_id = len(ROOTS)
        self._free_ckpts: deque[int] = deque(range(num_checkpoints))
        self._ckpts: OrderedDict[int, Checkpoint] = OrderedDict()  # live checkpoints, least recently used first
        self._ckpt_by_parent: dict[int, dict[tuple[int, ...], Checkpoint]] = {}
        self.stats = PrefixCacheStats()

    # ---- KV blocks -------------------------------------------------------------------------------------------

    @property
    def num_cached_blocks(self) -> int:
        return len(self._node_of_block)

    @property
    def num_idle_blocks(self) -> int:
        return len(self._idle)

    def is_cached(self, block: int) -> bool:
        return block in self._node_of_block

    def chain_span(self, root: int) -> int:
        """Tokens that name a block of the chain from `root`: its own, and for the MTP root the next one too.
        The MTP KV row of a block's last position pairs it with the next token (outside the block): without it in
        the key, a request diverging right after a block cached by another one would get the other's MTP row
        there (wrong drafts; the target KV alone does not depend on later tokens)."""
        return self.block_size + (1 if root == ROOTS[1] else 0)

    def register_block(self, parent: int, tokens: tuple[int, ...], block: int) -> tuple[int, bool]:
        """Name `block` as holding `tokens` (`chain_span` of them) after the prefix `parent`. Returns (node id,
        registered): when the key is already cached the existing node continues the chain and `block` stays
        private (False)."""
        assert len(tokens) in (self.block_size, self.block_size + 1), len(tokens)
        key = (parent, tokens)
        node = self._nodes.get(key)
        if node is not None:
            return node.node_id, False
        assert block not in self._node_of_block, f"block {block} is cached twice"
        node = _Node(self._next_node_id, block, key)
        self._next_node_id += 1
        self._nodes[key] = node
        self._node_of_block[block] = node
        return node.node_id, True

    def set_idle(self, block: int) -> None:
        """The last reference to a cached block went away: it becomes evictable (most recently used)."""
        self._idle[block] = None

    def set_busy(self, block: int) -> None:
        """An idle cached block is referenced again."""
        self._idle.pop(block, None)

    def evict_idle(self, n: int) -> list[int]:
        """Forget the n least recently used idle blocks; returns them for the allocator to free."""
        assert n <= len(self._idle), (n, len(self._idle))
        evicted = []
        for _ in range(n):
            block, _ = self._idle.popitem(last=False)
            node = self._node_of_block.pop(block)
            del self._nodes[node.key]
            evicted.append(block)
        self.stats.block_evictions += n
        return evicted

    # ---- lookup ----------------------------------------------------------------------------------------------

    def lookup(self, root: int, tokens: list[int], limit: int) -> Hit | None:
        """The deepest P <= limit where tokens[:P]'s full blocks and a checkpoint at P are both cached."""
        bs, span = self.block_size, self.chain_span(root)
        nodes: list[_Node] = []
        parent = root
        # full blocks strictly before the tail (P-1's block); the token after each is <= P-1, inside the prefix
        while (len(nodes) + 1) * bs <= limit - 1:
            start = len(nodes) * bs
            node = self._nodes.get((parent, tuple(tokens[start:start + span])))
            if node is None:
                break
            nodes.append(node)
            parent = node.node_id
        for depth in range(len(nodes), -1, -1):
            parent = nodes[depth - 1].node_id if depth else root
            best = None
            for ckpt in self._ckpt_by_parent.get(parent, {}).values():
                end = depth * bs + len(ckpt.tail)
                if end <= limit and (best is None or end > best.position) and \
                        tuple(tokens[depth * bs:end]) == ckpt.tail:
                    best = ckpt
            if best is not None:
                self._ckpts.move_to_end(best.ckpt_id)
                return Hit(best.position, [n.node_id for n in nodes[:depth]], [n.block for n in nodes[:depth]],
                           best)
        return None

    def count_query(self, num_prompt_tokens: int, hit: Hit | None) -> None:
        self.stats.num_queries += 1
        self.stats.query_tokens += num_prompt_tokens
        if hit is not None:
            self.stats.num_hits += 1
            self.stats.hit_tokens += min(hit.position, num_prompt_tokens)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    @property
    def num_checkpoints_used(self) -> int:
        return len(self._ckpts)

    def has_checkpoint(self, parent: int, tail: tuple[int, ...]) -> bool:
        return tail in self._ckpt_by_parent.get(parent, {})

    def add_checkpoint(self, parent: int, tail: tuple[int, ...], position: int,
                       tail_block: int) -> tuple[Checkpoint, Checkpoint | None]:
        """A new checkpoint, evicting the least recently used one when the pool is full (returned second: its
        tail block must be released). The caller checks `has_checkpoint` first."""
        assert 1 <= len(tail) <= self.block_size and not self.has_checkpoint(parent, tail)
        evicted = self.evict_lru_checkpoint() if not self._free_ckpts else None
        ckpt = Checkpoint(self._free_ckpts.popleft(), parent, tail, position, tail_block)
        self._ckpts[ckpt.ckpt_id] = ckpt
        self._ckpt_by_parent.setdefault(parent, {})[tail] = ckpt
        self.stats.checkpoints_taken += 1
        return ckpt, evicted

    def evict_lru_checkpoint(self) -> Checkpoint:
        """Forget the least recently used checkpoint; returns it (its tail block must be released)."""
        self.stats.checkpoint_evictions += 1
        return self._remove(next(iter(self._ckpts)))

    def is_live(self, ckpt: Checkpoint) -> bool:
        """The checkpoint was not evicted (its id and tail block may belong to a newer one if it was)."""
        return self._ckpts.get(ckpt.ckpt_id) is ckpt

    def _remove(self, ckpt_id: int) -> Checkpoint:
        ckpt = self._ckpts.pop(ckpt_id)
        siblings = self._ckpt_by_parent[ckpt.parent]
        del siblings[ckpt.tail]
        if not siblings:
            del self._ckpt_by_parent[ckpt.parent]
        self._free_ckpts.append(ckpt_id)
        return ckpt

    def clear(self) -> tuple[list[int], list[int]]:
        """Forget everything. Returns (idle blocks to free, checkpoint tail blocks to release); cached blocks
        still referenced by requests become plain private blocks."""
        idle = list(self._idle)
        tails = [self._remove(cid).tail_block for cid in list(self._ckpts)]
        self._idle.clear()
        self._nodes.clear()
        self._node_of_block.clear()
        return idle, tails
