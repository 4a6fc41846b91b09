"""The prefix cache's host tier (`tetri.sched.kv_host` through `BlockAllocator`): evicted
cached blocks move to host blocks, lookups upload them back, and the copies the allocator asks
for, applied to a model of both pools' contents, always leave every cached block holding
what its hash says."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetri.sched.kv_blocks import BlockAllocator
from tetri.sched.prefix_hash import block_hashes, cacheable_blocks

SEED = b"host-tier-test"


class Contents:
    """What each GPU and host block holds: the hash whose KV was written there (None: junk)."""

    def __init__(self) -> None:
        self.gpu: dict[int, object] = {}
        self.host: dict[int, object] = {}
        self.copies: list[tuple[list[int], list[int], bool]] = []

    def copy(self, src: list[int], dst: list[int], to_host: bool) -> None:
        self.copies.append((list(src), list(dst), to_host))
        frm, to = (self.gpu, self.host) if to_host else (self.host, self.gpu)
        values = [frm.get(s) for s in src]
        for d, v in zip(dst, values):
            to[d] = v

    def check(self, alloc: BlockAllocator) -> None:
        for b, h in alloc._hash_of.items():
            assert self.gpu.get(b) == h, f"GPU block {b} cached as {h!r} holds {self.gpu.get(b)!r}"
        if alloc.host is not None:
            for x, h in alloc.host._hash_of.items():
                assert self.host.get(x) == h, f"host block {x} cached as {h!r} holds {self.host.get(x)!r}"


def _prefill(alloc: BlockAllocator, mem: Contents, owner, tokens: list[int]) -> int:
    """A worker's prefill: look up (attach + upload), allocate the rest, write the KV it
    computes, commit the full blocks. Returns the cached tokens."""
    hashes = block_hashes(tokens, alloc.block_size, SEED)
    hit = alloc.lookup(owner, hashes[:cacheable_blocks(len(tokens), alloc.block_size)], len(tokens))
    ids = alloc.blocks_of(owner)
    for b, h in zip(ids, hashes[:hit // alloc.block_size]):
        assert mem.gpu.get(b) == h, "an attached block does not hold its prefix's KV"
    alloc.ensure_capacity(owner, len(tokens))
    alloc.check_writable(owner, hit, len(tokens))
    ids = alloc.blocks_of(owner)
    for i in range(hit // alloc.block_size, len(ids)):
        mem.gpu[ids[i]] = hashes[i] if i < len(hashes) else ("partial", owner)
    alloc.commit(owner, hashes)
    return hit


def _alloc(gpu=8, host=6, bs=4) -> tuple[BlockAllocator, Contents]:
    mem = Contents()
    return BlockAllocator(gpu, bs, enable_caching=True, host_blocks=host, on_copy=mem.copy), mem


def test_an_evicted_prefix_is_offloaded_then_uploaded_instead_of_recomputed():
    alloc, mem = _alloc(gpu=8, host=6)
    a = list(range(17))  # 4 full blocks + 1 token
    assert _prefill(alloc, mem, "a", a) == 0
    alloc.free("a")
    _prefill(alloc, mem, "b", [99] * 32)  # takes all 8 blocks: a's 4 cached ones go to the host
    assert alloc.take_evicted() == []  # nothing dropped for good: the front's index stays right
    assert alloc.offloaded_blocks == 4 and alloc.host.num_cached == 4
    assert [c[2] for c in mem.copies] == [True]  # one offload call for the allocation
    alloc.check_invariants()
    mem.check(alloc)
    alloc.free("b")
    assert _prefill(alloc, mem, "c", a) == 16  # found in the host tier
    assert (alloc.host_hits, alloc.uploaded_blocks) == (16, 4)
    uploads = [c for c in mem.copies if not c[2]]
    assert len(uploads) == 1 and len(uploads[0][0]) == 4  # one upload call for the 4 blocks
    assert not any(h in alloc.host for h in block_hashes(a, 4, SEED))  # they left the host tier
    alloc.check_invariants()
    mem.check(alloc)
    assert (alloc.queries, alloc.hits) == (17 + 32 + 17, 16)


def test_host_lru_drops_for_good_and_reports_it():
    alloc, mem = _alloc(gpu=4, host=2)
    first = list(range(8))
    _prefill(alloc, mem, "a", first + [0])
    alloc.free("a")
    _prefill(alloc, mem, "b", [7] * 16)  # a's 2 cached blocks offloaded (host now full)
    alloc.free("b")
    _prefill(alloc, mem, "c", [8] * 16)  # b's 4 evicted: host keeps the 2 latest, drops a's and b's others
    dropped = alloc.take_evicted()
    assert set(block_hashes(first, 4, SEED)) <= set(dropped) and len(dropped) == 4
    alloc.free("c")
    assert _prefill(alloc, mem, "d", first + [0]) == 0
    alloc.check_invariants()
    mem.check(alloc)


def test_upload_limited_by_free_blocks_and_never_evicts_its_own_prefix():
    alloc, mem = _alloc(gpu=7, host=8)
    p = list(range(24))  # 6 blocks
    _prefill(alloc, mem, "a", p)
    alloc.free("a")  # all 6 cached, evictable, tail first
    alloc.allocate("x", 4)  # the uncached free block, then a's last 3 evicted to the host
    assert alloc.host.num_cached == 3
    hashes = block_hashes(p + [1], 4, SEED)
    # 3 blocks on the GPU (evictable: the only free ones) + 3 in the host: attaching the 3 takes
    # every free block, so an upload would evict the prefix it extends; it stops there.
    assert alloc.lookup("b", hashes, 25) == 12 and alloc.uploaded_blocks == 0
    alloc.check_invariants()
    mem.check(alloc)
    alloc.free("b")
    alloc.free("x")
    assert _prefill(alloc, mem, "c", p + [1]) == 24 and alloc.uploaded_blocks == 3
    alloc.check_invariants()
    mem.check(alloc)


def test_a_lookup_leaves_the_promised_blocks_free():
    alloc, mem = _alloc(gpu=10, host=8)
    p = list(range(24))  # 6 blocks
    _prefill(alloc, mem, "a", p)
    alloc.free("a")
    alloc.allocate("x", 7)  # 4 free + a's last 3 offloaded: a's first 3 stay, unheld
    hashes = block_hashes(p + [1], 4, SEED)
    assert alloc.num_free == 3
    assert alloc.lookup("b", hashes, 25, keep_free_blocks=2) == 4  # only 1 of the 3 may be taken
    alloc.free("b")
    alloc.free("x")  # 7 uncached blocks back: 3 + 7 free
    assert alloc.lookup("c", hashes, 25, keep_free_blocks=5) == 20  # 3 attached + 2 uploads leave 5
    assert alloc.uploaded_blocks == 2 and alloc.num_free == 5
    alloc.check_invariants()
    mem.check(alloc)


def test_recomputing_a_host_cached_hash_drops_the_host_copy():
    alloc, mem = _alloc(gpu=4, host=4)
    _prefill(alloc, mem, "a", list(range(9)))
    alloc.free("a")
    alloc.allocate("x", 4)  # a's 2 blocks -> host
    alloc.free("x")
    alloc.ensure_capacity("b", 8)  # computes the same blocks without a lookup (prompt_logprobs)
    for b, h in zip(alloc.blocks_of("b"), block_hashes(list(range(8)), 4, SEED)):
        mem.gpu[b] = h
    alloc.commit("b", block_hashes(list(range(8)), 4, SEED))
    assert alloc.host.num_cached == 0 and alloc.num_cached == 2
    alloc.check_invariants()


def test_invariants_catch_a_hash_in_both_tiers_and_a_leaked_host_block():
    alloc, mem = _alloc(gpu=4, host=4)
    _prefill(alloc, mem, "a", list(range(9)))
    h = next(iter(alloc._by_hash))
    alloc.host.put(h)
    with pytest.raises(AssertionError, match="both"):
        alloc.check_invariants()
    alloc, mem = _alloc(gpu=4, host=4)
    alloc.host._free.pop()
    with pytest.raises(AssertionError, match="host"):
        alloc.check_invariants()


def test_zero_size_has_no_host_tier_and_caching_off_caches_nothing_there():
    assert BlockAllocator(4, 4, enable_caching=True, host_blocks=0).host is None
    alloc = BlockAllocator(4, 4, enable_caching=False, host_blocks=8)  # the KV swap's space only
    alloc.ensure_capacity("a", 16)
    alloc.free("a")
    alloc.ensure_capacity("b", 16)
    assert alloc.host.num_cached == 0 and alloc.offloaded_blocks == 0
    alloc.check_invariants()


PREFIXES = [[f * 100 + i for i in range(20)] for f in range(4)]
ops = st.lists(st.one_of(
    st.tuples(st.just("prefill"), st.integers(0, 3), st.integers(0, 20), st.integers(0, 9)),
    st.tuples(st.just("free"), st.integers(0, 10**6)),
    st.tuples(st.just("grow"), st.integers(1, 4)),
    st.tuples(st.just("clear"),),
), min_size=10, max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(4, 12), st.integers(1, 10), st.sampled_from([2, 4]))
def test_random_sequences_keep_both_tiers_consistent(seq, gpu_blocks, host_blocks, bs):
    _run_ops(seq, gpu_blocks, host_blocks, bs)


def test_a_long_random_sequence_offloads_and_uploads():
    """The same checks over a long seeded sequence, which reaches both copy directions often."""
    rng = random.Random(5)
    seq = [("prefill", rng.randrange(4), rng.randrange(21), rng.randrange(10)) if rng.random() < 0.5 else
           ("free", rng.randrange(100)) if rng.random() < 0.8 else ("grow", rng.randrange(1, 4))
           for _ in range(600)]
    alloc = _run_ops(seq, 10, 12, 2)
    assert alloc.uploaded_blocks > 20 and alloc.offloaded_blocks > 20 and alloc.host_hits > 0


def _run_ops(seq, gpu_blocks: int, host_blocks: int, bs: int) -> BlockAllocator:
    alloc, mem = _alloc(gpu=gpu_blocks, host=host_blocks, bs=bs)
    live: list[str] = []
    believed: set = set()  # the front's index: committed hashes less those reported evicted
    for n, op in enumerate(seq):
        before = set(alloc._by_hash)
        if op[0] == "prefill":
            tokens = (PREFIXES[op[1]][:op[2]] + [7000 + n] * (op[3] + 1))[-(gpu_blocks - 1) * bs:]
            while -(-len(tokens) // bs) > alloc.num_free:
                alloc.free(live.pop(0))  # the worker waits for the oldest to be released
            owner = f"r{n}"
            _prefill(alloc, mem, owner, tokens)
            live.append(owner)
        elif op[0] == "free" and live:
            alloc.free(live.pop(op[1] % len(live)))
        elif op[0] == "grow" and live and alloc.num_free >= op[1]:
            owner = live[-1]
            start = len(alloc.blocks_of(owner))
            new = alloc.allocate(owner, op[1])  # a decode growing: may evict (offload)
            for b in new:
                mem.gpu[b] = ("decode", owner, start)
        elif op[0] == "clear":
            alloc.clear_cache()
        alloc.check_invariants()
        mem.check(alloc)
        cached = set(alloc._by_hash) | set(alloc.host._by_hash)
        committed_now = set(alloc._by_hash) - before
        evicted = set(alloc.take_evicted())
        assert not (evicted & cached) - committed_now, "a hash reported evicted is still cached"
        believed = (believed - evicted) | committed_now
        assert cached <= believed, "a cached hash the front was told is gone"
    for owner in live:
        alloc.free(owner)
    alloc.check_invariants()
    assert alloc.num_used == 0 and alloc.num_free == gpu_blocks
    assert alloc.hits >= alloc.host_hits == alloc.uploaded_blocks * bs
    return alloc
