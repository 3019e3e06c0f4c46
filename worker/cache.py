"""Who owns which piece of the hybrid cache (docs/architecture.md §5).

Two resources, handed out by the same free-list bookkeeping:
- KV blocks of the full-attention layers: a sequence of n tokens owns ceil(n / block_size) blocks, listed in
  its block table; block b holds positions [i * block_size, (i + 1) * block_size) when it is the i-th entry.
- DeltaNet state slots: a running sequence owns exactly one, whatever its length.
Ids are indices into the device pools of `worker/cache_tensors.py`. A slot handed out again still holds the
previous owner's state; the model ignores it for a sequence's first chunk (`ForwardBatch.has_initial_state`).

With prefix caching the manager also keeps the prefix index current for the sequences it serves (which of a
request's full blocks are named in the index, which states to checkpoint, what a new request can restore): the
scheduler decides who runs, this module what each one's blocks mean to the index.

This module is plain Python on purpose: the scheduler runs it on the CPU and must not import torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qnext.worker.prefix_cache import Checkpoint, Hit, PrefixCache

if TYPE_CHECKING:
    from qnext.worker.scheduler import Request


@dataclass(frozen=True)
class Restore:
    """Before the forward: checkpoint `ckpt_id`'s state into `slot`, its tail block into `dst_block`."""

    request_id: str
    ckpt_id: int
    slot: int
    tail_block: int
    dst_block: int
    position: int  # the request starts computing here


@dataclass(frozen=True)
class CheckpointCopy:
    """After update: the state in `slot` and the block `src_block` (rows up to P-1) into `checkpoint` (its id
    and tail block), with the hidden state of P-1 from this step's row of that token; P = checkpoint.position."""

    request_id: str
    slot: int
    src_block: int
    checkpoint: Checkpoint = field(compare=False, repr=False)


class _IdPool:
    """Free list of the ids 0..num_total-1. Freed ids go to the back, so recently freed ones are reused last."""

    def __init__(self, kind: str, num_total: int) -> None:
        assert num_total >= 1, f"a cache needs at least one {kind}, got {num_total}"
        self.kind = kind
        self.num_total = num_total
        self._free = deque(range(num_total))
        self._is_free = [True] * num_total

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n ids, or None (and nothing taken) when fewer than n are free."""
        assert n >= 0, n
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._is_free[i] = False
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            assert 0 <= i < self.num_total, f"{self.kind} {i} is not from this pool of {self.num_total}"
            assert not self._is_free[i], f"double free of {self.kind} {i}"
            self._is_free[i] = True
            self._free.append(i)


class BlockPool(_IdPool):
    """KV blocks of the full-attention layers."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__("block", num_blocks)


class SlotPool:
    """DeltaNet state slots, one per running sequence."""

    def __init__(self, num_slots: int) -> None:
        self._ids = _IdPool("slot", num_slots)

    @property
    def num_free(self) -> int:
        return self._ids.num_free

    @property
    def num_total(self) -> int:
        return self._ids.num_total

    def allocate(self) -> int | None:
        ids = self._ids.allocate(1)
        return None if ids is None else ids[0]

    def free(self, slot: int) -> None:
        self._ids.free([slot])


class HybridCacheManager:
    """Grows and releases a sequence's (block table, slot) pair as one unit; "no room" is a None return.

    With a prefix cache, a block may be referenced by several sequences (a shared prefix) and by a checkpoint
    (its tail block): it returns to the free list, or becomes an idle cached block, when the last reference
    goes. Idle cached blocks and checkpoint tail blocks count as available: an allocation the free list cannot
    serve evicts idle blocks (least recently used first), then whole checkpoints (least recently used first),
    so the cache never keeps a sequence from running.
    """

    def __init__(self, num_blocks: int, block_size: int, num_slots: int, num_checkpoints: int = 0) -> None:
        assert block_size >= 1, block_size
        self.block_size = block_size
        self.blocks = BlockPool(num_blocks)
        self.slots = SlotPool(num_slots)
        self.prefix = PrefixCache(block_size, num_checkpoints) if num_checkpoints > 0 else None
        self._refs = [0] * num_blocks
        self.num_checkpoint_blocks = 0  # tail blocks held by prefix-cache checkpoints

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can get: free ones, idle cached ones and checkpoint tails."""
        if self.prefix is None:
            return self.blocks.num_free
        return self.blocks.num_free + self.prefix.num_idle_blocks + self.num_checkpoint_blocks

    def allocate_blocks(self, n: int) -> list[int] | None:
        """n blocks with one reference each, evicting cached prefixes when the free list is short."""
        if n > self.num_available_blocks:
            return None
        short = n - self.blocks.num_free
        if short > 0:
            self.blocks.free(self.prefix.evict_idle(min(short, self.prefix.num_idle_blocks)))
        while n > self.blocks.num_free:
            self.release_checkpoint_block(self.prefix.evict_lru_checkpoint().tail_block)
        ids = self.blocks.allocate(n)
        assert ids is not None
        for b in ids:
            self._refs[b] = 1
        return ids

    def share_blocks(self, block_ids: list[int]) -> None:
        """One more reference to each (cached) block."""
        for b in block_ids:
            if self._refs[b] == 0:
                self.prefix.set_busy(b)
            self._refs[b] += 1

    def drop_blocks(self, block_ids: list[int]) -> None:
        """One reference less to each; deepest first, so a prefix's tail is evicted before its head."""
        for b in reversed(block_ids):
            assert self._refs[b] > 0, f"block {b} released more often than referenced"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self.prefix is not None and self.prefix.is_cached(b):
                    self.prefix.set_idle(b)
                else:
                    self.blocks.free([b])

    def allocate_checkpoint_block(self) -> int | None:
        """A block for a checkpoint's tail (counted apart from the sequences' blocks), or None."""
        blocks = self.allocate_blocks(1)
        if blocks is None:
            return None
        self.num_checkpoint_blocks += 1
        return blocks[0]

    def release_checkpoint_block(self, block: int) -> None:
        self.num_checkpoint_blocks -= 1
        self.drop_blocks([block])

    def ensure(self, block_ids: list[int], slot: int | None, total_tokens: int) -> tuple[list[int], int] | None:
        """The sequence's (block_ids, slot) grown to cover total_tokens tokens and to own a slot.

        Returns a new list (block_ids itself is not modified), or None with nothing allocated when either
        blocks or a slot are short, so a failed attempt needs no undo. A table that already covers
        total_tokens is kept as it is (never shrunk).
        """
        num_new = max(0, self.blocks_for(total_tokens) - len(block_ids))
        if num_new > self.num_available_blocks or (slot is None and self.slots.num_free == 0):
            return None
        new_blocks = self.allocate_blocks(num_new)
        assert new_blocks is not None  # checked above
        if slot is None:
            slot = self.slots.allocate()
            assert slot is not None
        return block_ids + new_blocks, slot

    def release(self, block_ids: list[int], slot: int | None) -> None:
        self.drop_blocks(block_ids)
        if slot is not None:
            self.slots.free(slot)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix: idle blocks and checkpoint tail blocks go back to the free list."""
        if self.prefix is None:
            return
        idle, tails = self.prefix.clear()
        self.blocks.free(idle)
        for b in tails:
            self.release_checkpoint_block(b)

    def is_full(self) -> bool:
        """Every block and slot is free again (nothing leaked). Cached prefixes hold blocks: clear them first."""
        return self.blocks.num_free == self.blocks.num_total and self.slots.num_free == self.slots.num_total

    @property
    def kv_blocks_used(self) -> int:
        """Blocks referenced by running sequences (idle cached blocks and checkpoint tails: `kv_blocks_cached`)."""
        return self.blocks.num_total - self.num_available_blocks

    @property
    def kv_blocks_cached(self) -> int:
        """Blocks holding a cached prefix: named in the index (in use or idle) or a checkpoint's tail."""
        return (self.prefix.num_cached_blocks if self.prefix else 0) + self.num_checkpoint_blocks

    @property
    def kv_blocks_total(self) -> int:
        return self.blocks.num_total

    @property
    def state_slots_used(self) -> int:
        return self.slots.num_total - self.slots.num_free

    @property
    def state_slots_total(self) -> int:
        return self.slots.num_total

    # ---- the prefix index, kept current for the sequences' blocks (no-ops without a prefix cache) ----

    def restore_prefix(self, request: Request) -> tuple[Hit | None, Restore | None]:
        """For a request starting from nothing: the deepest cached prefix, with the blocks shared, a fresh tail
        block and a slot taken (undone with `release` if the request is not admitted after all)."""
        if self.prefix is None or not request.use_prefix_cache or request.num_computed_tokens:
            return None, None
        hit = self.prefix.lookup(request.prefix_root, request.all_token_ids, limit=request.num_tokens - 1)
        if hit is None:
            return None, None
        self.share_blocks(hit.blocks)
        grown = self.ensure(hit.blocks, None, hit.position)  # + the tail's block and a slot
        if grown is None:  # no slot or block for it now: the request waits like any other
            self.drop_blocks(hit.blocks)
            return None, None
        request.block_ids, request.state_slot = grown
        request.num_computed_tokens, request.prefix_nodes = hit.position, list(hit.nodes)
        ckpt = hit.checkpoint
        return hit, Restore(request.request_id, ckpt.ckpt_id, request.state_slot, ckpt.tail_block,
                            request.block_ids[len(hit.blocks)], hit.position)

    def record_admission(self, request: Request, hit: Hit | None, restored: bool) -> None:
        """Count an admission in the statistics: every restore, and a request's first admission as a query (a
        preempted one's return is not one)."""
        if self.prefix is None:
            return
        self.prefix.stats.num_restores += restored
        if request.use_prefix_cache and request.num_preemptions == 0:
            self.prefix.count_query(len(request.prompt_token_ids), hit)
            request.num_cached_tokens = min(hit.position, len(request.prompt_token_ids)) if hit else 0

    def index(self, request: Request, finished: bool) -> CheckpointCopy | None:
        """Name the request's newly completed full blocks in the prefix index; checkpoint its state when it has
        just computed a position where it wants one, or it finished (its conversation is the next turn's prefix).
        Returns the copy the engine must make right after the scheduler's update, if any."""
        prefix = self.prefix
        if prefix is None or not request.use_prefix_cache:
            return None
        known = self.register_blocks(request)
        position = request.num_computed_tokens
        wanted = finished or position == len(request.prompt_token_ids) or position in request.checkpoint_positions
        if position != known or position < 1 or not wanted:
            return None
        depth = (position - 1) // self.block_size
        parent = request.prefix_nodes[depth - 1] if depth else request.prefix_root
        tail = tuple(request.token_slice(depth * self.block_size, position))
        if prefix.has_checkpoint(parent, tail):
            return None
        tail_block = self.allocate_checkpoint_block()
        if tail_block is None:
            return None  # no block to spare: skip this checkpoint rather than evict a running request
        ckpt, evicted = prefix.add_checkpoint(parent, tail, position, tail_block)
        if evicted is not None:
            self.release_checkpoint_block(evicted.tail_block)
        return CheckpointCopy(request.request_id, request.state_slot, request.block_ids[depth], ckpt)

    def register_blocks(self, request: Request) -> int:
        """Name the request's newly completed full blocks in the prefix index; returns the tokens whose next
        token is known (only those count: a block's key includes the token after it with MTP)."""
        bs = self.block_size
        span = self.prefix.chain_span(request.prefix_root)
        known = min(request.num_computed_tokens, request.num_tokens - 1)
        while len(request.prefix_nodes) < known // bs:  # (i + 1) * bs <= known: the token after block i is known
            i = len(request.prefix_nodes)
            parent = request.prefix_nodes[-1] if request.prefix_nodes else request.prefix_root
            node, _ = self.prefix.register_block(parent, tuple(request.token_slice(i * bs, i * bs + span)),
                                                 request.block_ids[i])
            request.prefix_nodes.append(node)
        return known

    def reset_prefix_cache(self, running: list[Request]) -> None:
        """Forget every cached prefix. Running requests keep their blocks and name them in the index again from
        the root (their old chains point at forgotten nodes, so what they cache later would be unreachable)."""
        if self.prefix is None:
            return
        self.clear_prefix_cache()
        for request in running:
            request.prefix_nodes = []
            if request.use_prefix_cache:
                self.register_blocks(request)

    def live(self, copies: list[CheckpointCopy]) -> list[CheckpointCopy]:
        """The copies whose checkpoint was not evicted again after it was taken."""
        return [cp for cp in copies if self.prefix.is_live(cp.checkpoint)]

