"""`KVCopied` only once the copy completed, and no block a copy reads or writes is freed or reused
before that: the real nodes, model, pools and front scheduler in one process (tests/runtime/
inproc.py), with the decode worker's copies made to complete only when the test says (what a
CUDA event does while the copy stream runs)."""

import pytest

from tests.runtime.inproc import Cluster
from tests.transfer.fake_completion import FakeCompletion
from tetri.protocol import Dropped, KVCopied, PeerPools
from tetri.sched.front import ReqState
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.prefix_hash import block_hashes
from tetri.workers.node import pool_info

PROMPT = list(range(10, 60))  # 50 tokens: 4 blocks of 16


class GatedCopier:
    def __init__(self, inner) -> None:
        self.inner, self.gates = inner, []

    def copy(self, dst, src, src_ids, dst_ids):
        self.inner.copy(dst, src, src_ids, dst_ids)
        self.gates.append(FakeCompletion())
        return self.gates[-1]


@pytest.fixture
def cluster(default_model_dir):
    c = Cluster(default_model_dir)
    source = c.nodes[1].core.peers[0]
    source.copier = GatedCopier(source.copier)
    return c


def until(c: Cluster, cond, rounds=200):
    for _ in range(rounds):
        if cond():
            return
        for wid in c.nodes:
            c.deliver(wid)
        c.pump_front()
        for wid, node in c.nodes.items():
            if node.has_work():
                c.step(wid)
    raise AssertionError("condition never held")


def reference_tokens(model_dir, reqs, prefix_caching=True):
    c = Cluster(model_dir, prefix_caching=prefix_caching)
    for req_id, prompt, n in reqs:
        c.submit(req_id, prompt, max_tokens=n)
    c.run()
    return dict(c.tokens)


def test_kv_copied_waits_for_the_copy_and_its_blocks_stay_put(cluster, default_model_dir):
    c, decode, prefill = cluster, cluster.nodes[1], cluster.nodes[0]
    gates = decode.core.peers[0].copier.gates
    c.submit("long", [5, 6, 7], max_tokens=24)
    until(c, lambda: any(s.req_id == "long" for s in decode.core.running.values()))
    assert gates[0].waited == 1  # with nothing else to run, the worker waited for that copy
    c.submit("r", PROMPT, max_tokens=6)
    until(c, lambda: "r" in decode.core.copies)
    front_req = c.front.reqs["r"]
    copy = decode.core.copies._by_req["r"]
    dst_blocks = set(decode.ex.blocks.blocks_of(copy.seqs[0].key))
    held_by_prefill = set(prefill.ex.blocks.blocks_of(prefill.core.seqs["r"][0].key))
    c.pump_front()
    for _ in range(6):  # decode steps go on (the long request streams) while the copy is in flight
        before = len(c.tokens["long"])
        c.step(1)
        c.pump_front()
        assert len(c.tokens["long"]) == before + 1
        assert not any(isinstance(m, KVCopied) for m in c.to_front)
        assert front_req.state is ReqState.AWAIT_DECODE and "r" in decode.core.copies
        assert "r" not in {s.req_id for s in decode.core.running.values()}
    c.submit("other", PROMPT[:20], max_tokens=3)  # new work meanwhile must not get those blocks
    until(c, lambda: "other" in decode.core.copies)
    other = decode.core.copies._by_req["other"].seqs[0]
    assert set(decode.ex.blocks.blocks_of(other.key)).isdisjoint(dst_blocks)
    gates[-1].finished = True
    until(c, lambda: other.key in decode.core.running)
    assert "r" in decode.core.copies and front_req.state is ReqState.AWAIT_DECODE
    assert set(prefill.ex.blocks.blocks_of(prefill.core.seqs["r"][0].key)) == held_by_prefill  # not Released
    assert len(dst_blocks) == blocks_for_tokens(len(PROMPT) + 1, 16)
    gates[1].finished = True
    c.run()
    assert c.blocks_used() == {0: 0, 1: 0} and not c.failed
    want = reference_tokens(default_model_dir, [("long", [5, 6, 7], 24), ("r", PROMPT, 6), ("other", PROMPT[:20], 3)])
    assert {r: c.tokens[r] for r in want} == want


def test_an_abort_waits_for_the_copy_before_freeing_and_saying_dropped(cluster):
    c, decode = cluster, cluster.nodes[1]
    gates = decode.core.peers[0].copier.gates
    c.submit("long", [5, 6, 7], max_tokens=24)
    until(c, lambda: any(s.req_id == "long" for s in decode.core.running.values()))
    c.submit("r", PROMPT, max_tokens=6)
    until(c, lambda: "r" in decode.core.copies)
    gate = gates[-1]
    used = decode.ex.blocks.num_used
    c.abort("r")
    c.deliver(1)  # the Abort reaches the decode worker
    dropped = [m for m in c.to_front if isinstance(m, Dropped)]
    assert dropped and gate.waited == 1  # it waited for the copy before answering
    assert decode.ex.blocks.num_used < used and "r" not in decode.core.copies
    c.run()
    assert c.blocks_used() == {0: 0, 1: 0}


def _copy_in_flight(c: Cluster):
    """A request whose copy into the decode worker started and has not completed."""
    decode = c.nodes[1]
    c.submit("long", [5, 6, 7], max_tokens=24)
    until(c, lambda: any(s.req_id == "long" for s in decode.core.running.values()))
    c.submit("r", PROMPT, max_tokens=6)
    until(c, lambda: "r" in decode.core.copies)
    return decode.core.peers[0].copier.gates[-1]


def test_a_decode_worker_dying_mid_copy_frees_the_prefill_blocks(cluster):
    """The receiver dies with the copy in flight (no KVCopied ever comes): the front releases
    the prefill copy, so the sender holds nothing of either request."""
    c, prefill = cluster, cluster.nodes[0]
    gate = _copy_in_flight(c)
    assert not gate.finished and prefill.ex.blocks.num_used > 0
    c.dead.add(1)
    c.apply(c.front.on_worker_dead(1))
    c.run()
    assert "died" in c.failed["r"] and "died" in c.failed["long"]
    assert c.blocks_used() == {0: 0} and not prefill.has_work()


def test_a_prefill_worker_dying_mid_copy_frees_the_destination_blocks_after_the_copy(cluster, default_model_dir):
    """The sender dies with the copy in flight: the receiver waits for the copy (it reads the
    dead peer's mapping until it completes) before it frees the blocks the copy writes, then
    closes that mapping; the request it was decoding goes on undisturbed."""
    c, decode = cluster, cluster.nodes[1]
    gate = _copy_in_flight(c)
    source = decode.core.peers[0]
    c.dead.add(0)
    c.apply(c.front.on_worker_dead(0))
    c.deliver(1)  # the Abort for "r"
    assert gate.waited == 1 and "r" not in decode.core.copies
    assert decode.ex.blocks.num_used == len(decode.ex.blocks.blocks_of(next(iter(decode.core.running))))
    decode.handle(PeerPools(pools={1: pool_info(decode.ex.pool)}), c.now)  # the front's broadcast: 0 is gone
    assert decode.core.peers == {} and source.src is None
    c.run()
    assert "died" in c.failed["r"] and "long" not in c.failed
    assert c.blocks_used() == {1: 0}
    assert c.tokens["long"] == reference_tokens(default_model_dir, [("long", [5, 6, 7], 24)])["long"]


def test_a_copy_in_flight_over_cached_decode_blocks_commits_nothing_until_it_lands(cluster, default_model_dir):
    """Decode-side prefix caching with the copy still running: the prefix attached from the
    decode worker's cache is shared with a running request, the blocks being copied are not
    cached (a handoff of the same prompt meanwhile does not attach them), and an abort
    mid-copy frees only the aborted request's own blocks."""
    c, decode = cluster, cluster.nodes[1]
    blocks, gates = decode.ex.blocks, decode.core.peers[0].copier.gates
    c.submit("warm", PROMPT, max_tokens=3)
    until(c, lambda: "warm" in c.finished)  # 50 + 2 computed tokens: 3 full blocks cached there
    c.submit("long", PROMPT + [1] * 20, max_tokens=24)
    until(c, lambda: "long/0" in decode.core.running)
    assert decode.core.handoff_blocks_cached == 3
    prompt = PROMPT + [2] * 30
    c.submit("r", prompt, max_tokens=6)
    until(c, lambda: "r" in decode.core.copies)
    shared = blocks.blocks_of("long/0")[:3]
    assert blocks.blocks_of("r/0")[:3] == shared and decode.core.handoff_blocks_cached == 6
    hashes = block_hashes(prompt, 16, decode.ex.hash_seed)
    assert blocks.match(hashes) == shared  # r's own full blocks are not cached while copying
    c.submit("s", prompt, max_tokens=6)
    until(c, lambda: "s" in decode.core.copies)
    assert blocks.blocks_of("s/0")[:3] == shared and decode.core.handoff_blocks_cached == 9
    gate = gates[-2]
    c.abort("r")
    c.deliver(1)
    assert gate.waited == 1 and "r/0" not in blocks.owners() and blocks.blocks_of("long/0")[:3] == shared
    c.run()
    assert c.blocks_used() == {0: 0, 1: 0} and not c.failed
    want = reference_tokens(default_model_dir, [("long", PROMPT + [1] * 20, 24), ("s", prompt, 6)], prefix_caching=False)
    assert {r: c.tokens[r] for r in want} == want
