import random

import pytest

from qnext.worker.cache import BlockPool, HybridCacheManager, SlotPool


def test_block_pool_all_or_nothing_and_free() -> None:
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a is not None and len(set(a)) == 3 and pool.num_free == 1
    assert pool.allocate(2) is None and pool.num_free == 1  # nothing taken on failure
    assert pool.allocate(0) == []
    pool.free(a)
    assert pool.num_free == pool.num_total == 4


def test_block_pool_rejects_double_and_foreign_free() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    assert blocks is not None
    pool.free(blocks)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(blocks)
    with pytest.raises(AssertionError, match="not from this pool"):
        pool.free([2])
    b = pool.allocate(1)
    assert b is not None
    with pytest.raises(AssertionError, match="double free"):
        pool.free(b + b)  # the same id twice in one call


def test_slot_pool() -> None:
    pool = SlotPool(2)
    s0, s1 = pool.allocate(), pool.allocate()
    assert {s0, s1} == {0, 1} and pool.num_free == 0
    assert pool.allocate() is None
    pool.free(s0)
    with pytest.raises(AssertionError, match="double free of slot"):
        pool.free(s0)
    assert pool.allocate() == s0 and pool.num_total == 2


def test_ensure_grows_across_block_boundaries() -> None:
    cache = HybridCacheManager(num_blocks=8, block_size=4, num_slots=2)
    assert [cache.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    grown = cache.ensure([], None, 3)
    assert grown is not None
    blocks, slot = grown
    assert len(blocks) == 1 and cache.state_slots_used == 1
    assert cache.ensure(blocks, slot, 4) == (blocks, slot)  # still inside the first block
    grown = cache.ensure(blocks, slot, 5)
    assert grown is not None and grown[0][:1] == blocks and len(grown[0]) == 2 and grown[1] == slot
    assert len(blocks) == 1  # the caller's list is not modified
    blocks = grown[0]
    assert cache.ensure(blocks, slot, 2) == (blocks, slot)  # never shrinks
    assert cache.kv_blocks_used == 2 and cache.kv_blocks_total == 8 and cache.state_slots_total == 2
    cache.release(blocks, slot)
    assert cache.is_full()


def test_ensure_is_all_or_nothing() -> None:
    cache = HybridCacheManager(num_blocks=4, block_size=2, num_slots=1)
    a = cache.ensure([], None, 4)
    assert a is not None
    # Blocks are there but no slot: nothing is taken.
    assert cache.ensure([], None, 2) is None
    assert cache.kv_blocks_used == 2 and cache.state_slots_used == 1
    # The slot is owned but blocks are short: nothing is taken.
    assert cache.ensure(a[0], a[1], 9) is None
    assert cache.kv_blocks_used == 2
    grown = cache.ensure(a[0], a[1], 8)
    assert grown is not None and cache.kv_blocks_used == 4
    cache.release(*grown)
    assert cache.is_full()


def test_release_without_slot_and_is_full_after_random_mixes() -> None:
    rng = random.Random(0)
    cache = HybridCacheManager(num_blocks=16, block_size=3, num_slots=4)
    owned: list[tuple[list[int], int]] = []
    for _ in range(500):
        if owned and rng.random() < 0.4:
            cache.release(*owned.pop(rng.randrange(len(owned))))
        elif owned and rng.random() < 0.5:
            i = rng.randrange(len(owned))
            grown = cache.ensure(owned[i][0], owned[i][1], len(owned[i][0]) * 3 + rng.randint(1, 7))
            if grown is not None:
                owned[i] = grown
        else:
            grown = cache.ensure([], None, rng.randint(1, 12))
            if grown is not None:
                owned.append(grown)
        blocks = [b for bs, _ in owned for b in bs]
        assert len(blocks) == len(set(blocks)) == cache.kv_blocks_used
        assert len({s for _, s in owned}) == len(owned) == cache.state_slots_used
        assert not cache.is_full() or not owned
    for blocks, slot in owned:
        cache.release(blocks, slot)
    assert cache.is_full()
    grown = cache.ensure([], None, 1)
    assert grown is not None
    cache.release(grown[0], None)  # blocks only: the slot is still owned
    assert not cache.is_full() and cache.kv_blocks_used == 0 and cache.state_slots_used == 1
    cache.release([], grown[1])
    assert cache.is_full()
