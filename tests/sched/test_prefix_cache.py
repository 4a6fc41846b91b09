"""Prefix caching's pure parts: the block hash chain, the allocator's cached/shared states
(ref counts, LRU eviction only when the free list runs out, never writing a shared block),
the front's index, and chunks that start where the cache ends."""

import random

import pytest

from tetri.protocol import ChunkDone, PrefillResult
from tetri.sched.chunking import ChunkPacker
from tetri.sched.front import FrontConfig, FrontReq, FrontScheduler
from tetri.sched.kv_blocks import BlockAllocator
from tetri.sched.load import WorkerLoad
from tetri.sched.prefix_hash import block_hashes, cacheable_blocks, extend_block_hashes, hash_seed
from tetri.sched.prefix_index import PrefixIndex
from tetri.types import SamplingParams

SEED = hash_seed("model-a")


def test_the_hash_chain_covers_every_earlier_token_and_the_model():
    a = block_hashes(list(range(40)), 8, SEED)
    b = block_hashes(list(range(40)), 8, SEED)
    assert len(a) == 5 and a == b
    c = block_hashes([99] + list(range(1, 40)), 8, SEED)  # first token differs: every block differs
    assert not set(a) & set(c)
    d = block_hashes(list(range(24)) + [7] * 16, 8, SEED)  # same first 3 blocks only
    assert d[:3] == a[:3] and d[3] != a[3]
    assert block_hashes(list(range(40)), 8, hash_seed("model-b"))[0] != a[0]
    assert len(block_hashes(list(range(39)), 8, SEED)) == 4  # a partial block is never hashed
    grown = extend_block_hashes(a[:2], list(range(40)), 8, SEED, upto_tokens=33)
    assert grown == a[:4]
    assert cacheable_blocks(32, 8) == 3 and cacheable_blocks(33, 8) == 4 and cacheable_blocks(1, 8) == 0


def _prefill(alloc: BlockAllocator, owner, tokens: list[int]) -> int:
    """What a worker does: attach the cached prefix, allocate the rest, commit full blocks."""
    hashes = block_hashes(tokens, alloc.block_size, SEED)
    hit = alloc.lookup(owner, hashes[:cacheable_blocks(len(tokens), alloc.block_size)], len(tokens))
    alloc.ensure_capacity(owner, len(tokens))
    alloc.check_writable(owner, hit, len(tokens))
    alloc.commit(owner, hashes)
    alloc.check_invariants()
    return hit


def test_shared_blocks_are_ref_counted_and_never_writable():
    alloc = BlockAllocator(16, 4, enable_caching=True)
    assert _prefill(alloc, "a", list(range(10))) == 0
    assert _prefill(alloc, "b", list(range(10)) + [50, 51]) == 8  # 2 full blocks shared
    shared = alloc.blocks_of("a")[:2]
    assert alloc.blocks_of("b")[:2] == shared
    with pytest.raises(AssertionError, match="would write"):
        alloc.check_writable("b", 4, 9)  # block 1 is shared
    with pytest.raises(AssertionError, match="would write"):
        alloc.check_writable("a", 7, 8)  # cached, even with one holder
    alloc.free("a")
    assert alloc.num_used == 3  # b's 3 blocks; a's private third block went back to the free list
    alloc.free("b")
    assert alloc.num_used == 0 and alloc.num_free == 16 and alloc.num_cached == 3
    alloc.check_invariants()
    assert _prefill(alloc, "c", list(range(10)) + [50, 51, 1]) == 12  # nobody held them: still cached
    assert (alloc.queries, alloc.hits) == (10 + 12 + 13, 0 + 8 + 12)


def test_cached_blocks_are_evicted_lru_only_when_the_free_list_runs_out():
    alloc = BlockAllocator(8, 4, enable_caching=True)
    _prefill(alloc, "old", [1] * 8)  # 2 cached blocks
    alloc.free("old")
    _prefill(alloc, "new", [2] * 8)
    alloc.free("new")
    assert alloc.num_cached == 4 and alloc.num_free == 8
    alloc.allocate("x", 4)  # the 4 uncached free blocks: nothing evicted
    assert alloc.num_cached == 4 and alloc.take_evicted() == []
    alloc.allocate("y", 1)  # evicts the least recently released: old's tail block first
    old = block_hashes([1] * 8, 4, SEED)
    assert alloc.take_evicted() == [old[1]]
    alloc.check_invariants()
    assert alloc.match(old) == alloc.match(old[:1]) and len(alloc.match(old)) == 1
    alloc.allocate("y", 3)
    assert set(alloc.take_evicted()) == {old[0]} | set(block_hashes([2] * 8, 4, SEED))
    assert alloc.num_cached == 0 and alloc.num_free == 0
    alloc.check_invariants()


def test_duplicate_prefix_computed_twice_stays_cached_once_and_frees_cleanly():
    alloc = BlockAllocator(8, 4, enable_caching=True)
    hashes = block_hashes([3] * 8, 4, SEED)
    for owner in ("a", "b"):  # both computed before either committed
        alloc.ensure_capacity(owner, 8)
    alloc.commit("a", hashes)
    alloc.commit("b", hashes)
    assert alloc.num_cached == 2
    alloc.check_invariants()
    alloc.free("a"), alloc.free("b")
    assert alloc.num_used == 0 and alloc.num_free == 8
    alloc.check_invariants()


def test_caching_off_caches_nothing():
    alloc = BlockAllocator(8, 4)
    assert _prefill(alloc, "a", [1] * 9) == 0
    alloc.free("a")
    assert _prefill(alloc, "b", [1] * 9) == 0 and alloc.num_cached == 0


def test_invariants_catch_a_corrupted_state():
    alloc = BlockAllocator(8, 4, enable_caching=True)
    _prefill(alloc, "a", [1] * 8)
    alloc._ref[alloc.blocks_of("a")[0]] += 1
    with pytest.raises(AssertionError, match="ref"):
        alloc.check_invariants()
    alloc = BlockAllocator(8, 4, enable_caching=True)
    _prefill(alloc, "a", [1] * 8)
    alloc.free("a")
    alloc._free.append(next(iter(alloc._evictable)))
    with pytest.raises(AssertionError):
        alloc.check_invariants()


def test_random_workload_keeps_every_invariant():
    rng = random.Random(7)
    alloc = BlockAllocator(24, 4, enable_caching=True)
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    live = {}
    for step in range(400):
        if live and (rng.random() < 0.45 or alloc.num_free < 6):
            alloc.free(live.pop(rng.choice(sorted(live))))
        else:
            tokens = rng.choice(prefixes)[:rng.randrange(1, 13)] + [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
            owner = f"r{step}"
            _prefill(alloc, owner, tokens)
            live[owner] = owner
        alloc.check_invariants()
    for owner in list(live):
        alloc.free(owner)
    alloc.check_invariants()
    assert alloc.num_used == 0 and alloc.num_free == 24 and alloc.hits > 0


def test_index_matches_leading_blocks_and_forgets_evictions():
    index = PrefixIndex()
    hashes = block_hashes(list(range(32)), 8, SEED)
    index.add(1, hashes[:3])
    assert index.matched_blocks(1, hashes) == 3 and index.matched_blocks(2, hashes) == 0
    index.evicted(1, [hashes[1]])
    assert index.matched_blocks(1, hashes) == 1
    index.forget(1)
    assert index.matched_blocks(1, hashes) == 0


def test_packer_counts_only_uncached_tokens_and_keeps_the_chunk_full():
    packer = ChunkPacker(chunk_size=32)
    packer.add("a", 40, start=32)  # first 32 tokens cached
    packer.add("b", 30)
    assert packer.queued_tokens == 8 + 30
    chunk = packer.next_chunk()
    assert [(p.req_id, p.start, p.num_tokens) for p in chunk] == [("a", 32, 8), ("b", 0, 24)]


def _front(caching: bool) -> FrontScheduler:
    return FrontScheduler(FrontConfig(chunk_size=32, prefix_caching=caching, prefix_hash_seed=SEED),
                          random.Random(0))


def test_front_starts_a_prompt_where_its_workers_cache_ends():
    loads = [WorkerLoad(0, "prefill", block_size=8), WorkerLoad(1, "decode", block_size=8, free_blocks=100)]
    params = SamplingParams(max_tokens=4)
    prompt = list(range(40))
    for caching, expect_start in ((True, 40), (False, 0)):
        front = _front(caching)
        front.add(FrontReq("a", prompt, params, 0.0), loads, 0.0)
        acts = front.on_chunk_done(ChunkDone(worker_id=0, chunk_id=1), loads, 0.0)
        acts = front.on_chunk_done(ChunkDone(worker_id=0, chunk_id=2, finished=[PrefillResult(
            req_id="a", block_ids=list(range(5)), num_prompt_tokens=40, first_tokens=[1])]), loads, 0.0)
        acts = front.add(FrontReq("b", prompt + [7, 8], params, 0.0), loads, 0.0)
        first = [m for _, m in acts.sends if hasattr(m, "pieces")][0].pieces[0]
        assert (first.req_id, first.start) == ("b", expect_start)
    # An eviction report takes the evicted blocks (and every later one) out of the estimate.
    front = _front(True)
    front.add(FrontReq("a", prompt, params, 0.0), loads, 0.0)
    front.on_chunk_done(ChunkDone(worker_id=0, chunk_id=1, finished=[PrefillResult(
        req_id="a", block_ids=list(range(5)), num_prompt_tokens=40, first_tokens=[1])]), loads, 0.0)
    front.on_chunk_done(ChunkDone(worker_id=0, chunk_id=2, evicted_hashes=[block_hashes(prompt, 8, SEED)[2]]),
                        loads, 0.0)
    acts = front.add(FrontReq("c", prompt, params, 0.0), loads, 0.0)
    first = [m for _, m in acts.sends if hasattr(m, "pieces")][0].pieces[0]
    assert (first.req_id, first.start) == ("c", 16)
