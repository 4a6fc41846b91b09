"""KV swap bookkeeping (issue 19 item 5): a host block is free, cached or held; a swapped job's
blocks come back with identical contents; nothing leaks; the swap-or-recompute choice."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetri.sched.kv_blocks import BlockAllocator, OutOfBlocks
from tetri.sched.kv_host import HostBlocks
from tetri.sched.swap import CostMeter, choose_preemption


class Memory:
    """The pools as dicts: the allocator's on_copy moves values, so contents can be compared."""

    def __init__(self) -> None:
        self.gpu: dict[int, object] = {}
        self.host: dict[int, object] = {}
        self.copies: list[tuple[bool, int]] = []

    def copy(self, src, dst, to_host) -> None:
        frm, to = (self.gpu, self.host) if to_host else (self.host, self.gpu)
        for s, d in zip(src, dst):
            to[d] = frm.get(s)
        self.copies.append((to_host, len(src)))


def _alloc(num_blocks=8, host_blocks=6, caching=False):
    mem = Memory()
    return BlockAllocator(num_blocks, 4, enable_caching=caching, host_blocks=host_blocks, on_copy=mem.copy), mem


def _write(a: BlockAllocator, mem: Memory, owner) -> list:
    vals = [(owner, i) for i in range(len(a.blocks_of(owner)))]
    for b, v in zip(a.blocks_of(owner), vals):
        mem.gpu[b] = v
    return vals


def test_swap_out_frees_the_gpu_blocks_and_swap_in_brings_identical_contents_back():
    a, mem = _alloc()
    a.ensure_capacity("r", 10)  # 3 blocks, the last one partial (never hashed)
    vals = _write(a, mem, "r")
    assert a.swap_out("r") == 3
    a.check_invariants()
    assert a.blocks_of("r") == [] and a.num_free == 8 and a.host.num_held == 3 and a.swapped_blocks("r") == 3
    a.ensure_capacity("other", 32)  # every GPU block rewritten by someone else
    _write(a, mem, "other")
    with pytest.raises(OutOfBlocks):
        a.swap_in("r")
    assert a.host.num_held == 3  # a failed swap-in loses nothing
    a.free("other")
    ids = a.swap_in("r")
    a.check_invariants()
    assert [mem.gpu[b] for b in ids] == vals and a.host.num_held == 0 and a.swapped_blocks("r") == 0
    assert mem.copies == [(True, 3), (False, 3)]
    assert a.swapped_out_blocks == a.swapped_in_blocks == 3


def test_begin_and_end_bracket_an_asynchronous_copy():
    """Between begin and end (the copy in flight) the owner holds both its pool blocks and its
    host blocks; only end frees the side the copy read."""
    a, mem = _alloc()
    a.ensure_capacity("r", 10)
    vals = _write(a, mem, "r")
    gpu_ids, host_ids = a.begin_swap_out("r")
    a.check_invariants()
    assert gpu_ids == a.blocks_of("r") and len(host_ids) == 3 and a.num_free == 5 and a.host.num_held == 3
    mem.copy(gpu_ids, host_ids, True)  # the caller's copy
    assert a.end_swap_out("r") == 3 and a.num_free == 8 and a.swapped_blocks("r") == 3
    back, new_ids = a.begin_swap_in("r")
    assert back == host_ids and a.blocks_of("r") == new_ids and a.host.num_held == 3  # the upload reads them
    mem.copy(back, new_ids, False)
    assert a.end_swap_in("r") == 3 and a.host.num_held == 0 and [mem.gpu[b] for b in new_ids] == vals
    a.check_invariants()
    assert mem.copies == [(True, 3), (False, 3)]  # the allocator itself asked for no copy


def test_swap_out_refuses_when_the_host_cannot_hold_the_job_and_changes_nothing():
    a, mem = _alloc(host_blocks=2)
    a.ensure_capacity("r", 12)
    assert not a.can_swap_out("r") and a.swap_out("r") == 0
    assert len(a.blocks_of("r")) == 3 and mem.copies == []
    a.check_invariants()


def test_held_host_blocks_are_never_evicted_by_the_prefix_cache_tier_but_take_cached_ones():
    a, mem = _alloc(num_blocks=4, host_blocks=3, caching=True)
    a.ensure_capacity("p", 8)
    a.commit("p", [b"h0", b"h1"])
    a.free("p")  # two cached unheld GPU blocks
    a.ensure_capacity("q", 16)  # evicts both: offloaded to the host LRU
    assert a.host.num_cached == 2
    a.free("q")
    a.ensure_capacity("r", 12)
    assert a.swap_out("r") == 3  # one free host block + the two cached ones (their hashes dropped)
    assert a.host.num_cached == 0 and sorted(a.take_evicted()) == [b"h0", b"h1"]
    a.ensure_capacity("s", 16)
    a.commit("s", [b"a", b"b", b"c", b"d"])
    a.free("s")
    a.ensure_capacity("t", 16)  # evicts 4 cached GPU blocks: the host is all held, so they drop
    assert a.host.num_held == 3 and a.host.num_cached == 0
    a.check_invariants()


def test_drop_swapped_frees_host_blocks_and_hold_twice_is_refused():
    h = HostBlocks(4)
    assert h.hold("r", 3)[0] and h.hold("s", 2) is None
    with pytest.raises(ValueError):
        h.hold("r", 1)
    h.check()
    assert h.unhold("r") == 3 and h.unhold("r") == 0
    h.check()


OPS = st.lists(st.tuples(st.sampled_from(["grow", "free", "out", "in", "drop", "commit"]),
                         st.integers(0, 4), st.integers(1, 12)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(OPS, st.booleans())
def test_random_swaps_leak_nothing_and_every_round_trip_keeps_contents(ops, caching):
    a, mem = _alloc(num_blocks=10, host_blocks=7, caching=caching)
    saved: dict[int, list] = {}  # owner -> contents at swap-out
    for op, owner, n in ops:
        held = a.blocks_of(owner)
        if op == "grow" and owner not in saved and a.can_allocate(n // 4 + 1):
            a.ensure_capacity(owner, len(held) * 4 + n)
            _write(a, mem, owner)
        elif op == "free" and owner not in saved:
            a.free(owner)
        elif op == "out" and held and a.can_swap_out(owner) and all(b not in a._hash_of for b in held):
            saved[owner] = [mem.gpu[b] for b in held]
            assert a.swap_out(owner) == len(saved[owner])
        elif op == "in" and owner in saved and a.can_allocate(len(saved[owner])):
            ids = a.swap_in(owner)
            assert [mem.gpu[b] for b in ids] == saved.pop(owner)
        elif op == "drop" and owner in saved:
            assert a.drop_swapped(owner) == len(saved.pop(owner))
        elif op == "commit" and caching and held and owner not in saved:
            a.commit(owner, [bytes([owner, i, n]) for i in range(len(held))][: len(held) - 1])
        a.check_invariants()
        assert a.host.num_held == sum(len(v) for v in saved.values())
    for owner in list(saved):
        a.drop_swapped(owner)
    for owner in a.owners():
        a.free(owner)
    a.check_invariants()
    assert a.num_free == 10 and a.host.num_held == 0


def test_the_choice_swaps_when_copies_are_cheaper_than_the_re_prefill():
    # 10 blocks of 16 tokens: swap 2 * 10 * 1 ms = 20 ms; recompute 160 tokens
    assert choose_preemption(10, 160, 1e-3, 2e-4, True) == "swap"  # recompute 32 ms
    assert choose_preemption(10, 160, 1e-3, 1e-4, True) == "recompute"  # recompute 16 ms
    assert choose_preemption(10, 160, 1e-3, 2e-4, False) == "recompute"  # no host room
    assert choose_preemption(10, 160, None, 1e-4, True) == "swap"  # copy cost unknown: learn it
    assert choose_preemption(10, 160, 1e-3, None, True) == "recompute"  # prefill unknown: learn it
    assert choose_preemption(10, 160, 1e-3, None, True, prefill_pending=True) == "swap"  # one is learning it
    assert choose_preemption(10, 160, 1e-3, 1e-4, True, "swap") == "swap"
    assert choose_preemption(10, 160, 1e-3, 2e-4, True, "recompute") == "recompute"
    with pytest.raises(ValueError):
        choose_preemption(1, 1, 1.0, 1.0, True, "lru")


def test_the_cost_meter_averages_per_unit_costs():
    m = CostMeter(weight=0.5)
    assert m.choose(4, 64, True) == "swap"
    m.add_copy(4, 4e-3)
    assert m.copy_s_per_block == pytest.approx(1e-3) and m.choose(4, 64, True) == "recompute"
    m.add_copy(2, 6e-3)
    assert m.copy_s_per_block == pytest.approx(2e-3)
    m.add_prefill(100, 1e-2)  # 1e-4 s/token: recompute 64 tokens 6.4 ms < swap 16 ms
    assert m.choose(4, 64, True) == "recompute" and m.choose(4, 400, True) == "swap"


def test_a_swap_only_host_tier_drops_evicted_cached_blocks_instead_of_offloading_them():
    mem = Memory()
    a = BlockAllocator(4, 4, enable_caching=True, host_blocks=4, on_copy=mem.copy, offload_evicted=False)
    a.ensure_capacity("p", 8)
    a.commit("p", [b"h0", b"h1"])
    a.free("p")
    a.ensure_capacity("q", 16)  # evicts both cached blocks: dropped, no copy
    assert a.host.num_cached == 0 and mem.copies == [] and sorted(a.take_evicted()) == [b"h0", b"h1"]
    a.check_invariants()
