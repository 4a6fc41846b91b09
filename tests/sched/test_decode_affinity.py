"""Level-2 prefix affinity (`tetri.sched.decode_affinity`) against synthetic load boards."""

import random

from tetri.sched.decode_affinity import PrefixAffinityDecode
from tetri.sched.dispatch import make_decode_dispatch
from tetri.sched.load import ReqInfo, WorkerLoad
from tetri.sched.prefix_index import PrefixIndex

HASHES = tuple(bytes([i]) * 32 for i in range(6))  # a 96-token prompt's full blocks


def req(hashes=HASHES, prompt_tokens=100):
    return ReqInfo("r", prompt_tokens=prompt_tokens, max_tokens=50, prefix_hashes=hashes, prefix_block_tokens=16)


def dw(wid, running=0, free=1000, total=1000, max_num_seqs=256):
    return WorkerLoad(wid, "decode", running_reqs=running, free_blocks=free, total_blocks=total,
                      max_num_seqs=max_num_seqs)


def affinity(inner="least-loaded", seed=0, held=None):
    index = PrefixIndex()
    for wid, hashes in (held or {}).items():
        index.add(wid, list(hashes))
    return PrefixAffinityDecode(make_decode_dispatch(inner, random.Random(seed)), index), index


def test_the_holder_wins_when_loads_are_close():
    d, _ = affinity(held={2: HASHES})
    loads = [dw(1, running=3), dw(2, running=10)]  # least-loaded alone picks 1
    assert d.inner.pick(loads, req()) == 1
    assert d.pick(loads, req()) == 2


def test_a_longer_match_beats_a_shorter_one_at_equal_load():
    d, _ = affinity(held={1: HASHES[:2], 2: HASHES[:5], 3: HASHES[1:]})  # 3 lacks the first block: no match
    assert d.pick([dw(1), dw(2), dw(3)], req()) == 2


def test_load_balance_wins_when_loads_differ_a_lot():
    d, _ = affinity(held={2: HASHES})
    # a whole-prompt match is worth 1/8 of a worker: 32 of 256 slots, or 125 of 1000 blocks
    assert d.pick([dw(1, running=10), dw(2, running=40)], req()) == 2
    assert d.pick([dw(1, running=10), dw(2, running=60)], req()) == 1
    assert d.pick([dw(1, free=900), dw(2, free=700)], req()) == 1  # KV-block load counts too


def test_a_holder_that_cannot_admit_is_not_chosen():
    d, _ = affinity(held={2: HASHES})
    assert d.pick([dw(1), dw(2, free=3)], req()) == 1  # 100 prompt tokens need 7 blocks
    assert d.pick([dw(1), dw(2, running=8, max_num_seqs=8)], req()) == 1  # no free slot


def test_no_match_or_no_hashes_is_the_inner_pick_with_the_same_draws():
    loads = [dw(w, running=w % 3) for w in range(5)]
    d, _ = affinity("power-of-two", seed=4, held={9: HASHES})
    bare = make_decode_dispatch("power-of-two", random.Random(4))
    for i in range(40):
        r = req(hashes=() if i % 2 else HASHES)
        assert d.pick(loads, r) == bare.pick(loads, r)


def test_an_eviction_report_or_a_forgotten_worker_drops_the_preference():
    d, index = affinity(held={2: HASHES, 3: HASHES})
    loads = [dw(1), dw(2, running=1), dw(3, running=1)]
    assert d.pick(loads, req()) == 2
    index.evicted(2, [HASHES[0]])  # its chain is broken at the first block: nothing matches there
    assert d.pick(loads, req()) == 3
    index.forget(3)
    assert d.pick(loads, req()) == 1
