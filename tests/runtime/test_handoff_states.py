"""Abort a request in every state of the KV handoff, on the real model and pools, and find
every block free on every worker afterwards (invariants checked after every step)."""

import pytest

from tests.runtime.inproc import Cluster
from tetri.sched.front import ReqState

LONG = list(range(10, 110))  # 100 tokens: 7 chunks of 16


@pytest.fixture
def cluster(default_model_dir):
    return Cluster(default_model_dir)


def finish_and_check(c: Cluster, survivors=()):
    c.run()
    c.check()
    assert c.blocks_used() == {w: 0 for w in c.blocks_used()}
    assert c.front.reqs == {}
    for r in survivors:
        assert c.finished.get(r) == "length", (r, c.failed)


def test_reference_run_completes_and_frees_everything(cluster):
    cluster.submit("a", LONG, max_tokens=6)
    cluster.submit("b", [5, 6, 7], max_tokens=4, n=2)
    finish_and_check(cluster, ["a", "b"])
    assert len(cluster.tokens["a"]) == 6


def test_abort_while_queued_in_the_front(cluster):
    cluster.submit("a", LONG)
    cluster.submit("b", LONG)  # two chunks ahead are all of a's first 32 tokens: b never left the front
    assert cluster.front.reqs["b"].state is ReqState.QUEUED
    cluster.abort("b")
    finish_and_check(cluster, ["a"])


def test_abort_while_prefilling(cluster):
    cluster.submit("a", LONG)
    cluster.deliver(0)
    cluster.step(0)  # first chunk ran: blocks allocated on the prefill worker
    assert cluster.nodes[0].ex.blocks.num_used > 0
    assert cluster.front.reqs["a"].state is ReqState.PREFILLING
    cluster.abort("a")
    finish_and_check(cluster)


def test_abort_before_its_first_chunk_ran_on_the_worker(cluster):
    cluster.submit("a", LONG)
    cluster.deliver(0)  # chunks queued in the worker, none run
    cluster.abort("a")
    finish_and_check(cluster)


def test_abort_while_last_chunk_is_running(cluster):
    cluster.submit("a", [5, 6, 7, 8])
    cluster.deliver(0)
    cluster.abort("a")  # the Abort is queued behind the chunk the worker is about to run
    cluster.to_workers[0], pending = type(cluster.to_workers[0])(), cluster.to_workers[0]
    cluster.step(0)  # runs the chunk: a PrefillResult for a request the front already dropped
    cluster.to_workers[0].extend(pending)
    finish_and_check(cluster)


def test_abort_while_awaiting_decode_admission(cluster):
    cluster.submit("a", [5, 6, 7, 8, 9])
    cluster.deliver(0)
    cluster.step(0)
    cluster.pump_front()  # Handoff ordered, not yet seen by the decode worker
    assert cluster.front.reqs["a"].state is ReqState.AWAIT_DECODE
    cluster.abort("a")
    assert cluster.nodes[0].ex.blocks.num_used > 0  # prefill copy kept until the decode says Dropped
    finish_and_check(cluster)


def test_abort_while_decode_admission_is_blocked_by_memory(default_model_dir):
    c = Cluster(default_model_dir, num_blocks=8)
    c.submit("hog", list(range(10, 100)), max_tokens=30)  # 90 tokens: 6 of the decode worker's 8 blocks
    for _ in range(40):
        for w in c.nodes:
            c.deliver(w)
        c.pump_front()
        if c.front.reqs.get("hog") and c.front.reqs["hog"].state is ReqState.DECODING:
            break
        for w in c.nodes:
            if c.nodes[w].has_work():
                c.step(w)
    c.submit("small", list(range(10, 60)), max_tokens=4)  # needs 4 blocks: must wait for the hog
    for _ in range(6):
        c.round()
    assert c.front.reqs["small"].state is ReqState.AWAIT_DECODE
    assert "small" in c.nodes[1].core.waiting
    c.abort("small")
    finish_and_check(c, ["hog"])


def test_abort_while_copying(cluster):
    """The decode worker copied the KV (KVCopied in flight) when the front aborts."""
    cluster.submit("a", [5, 6, 7, 8, 9])
    cluster.deliver(0)
    cluster.step(0)
    cluster.pump_front()
    cluster.deliver(1)
    cluster.step(1)  # admits, copies, decodes one step; KVCopied + tokens are in flight
    assert any(type(m).__name__ == "KVCopied" for m in cluster.to_front)
    assert cluster.front.reqs["a"].state is ReqState.AWAIT_DECODE
    cluster.abort("a")
    finish_and_check(cluster)


def test_abort_while_decoding(cluster):
    cluster.submit("a", [5, 6, 7, 8, 9], max_tokens=50)
    for _ in range(6):
        for w in cluster.nodes:
            cluster.deliver(w)
            if cluster.nodes[w].has_work():
                cluster.step(w)
        cluster.pump_front()
    assert cluster.front.reqs["a"].state is ReqState.DECODING
    assert cluster.nodes[1].ex.blocks.num_used > 0
    cluster.abort("a")
    finish_and_check(cluster)


def test_decode_worker_death_releases_prefill_blocks(cluster):
    cluster.submit("a", [5, 6, 7, 8, 9], max_tokens=50)
    cluster.deliver(0)
    cluster.step(0)
    cluster.pump_front()  # handoff ordered to worker 1, which then dies
    cluster.dead.add(1)
    cluster.apply(cluster.front.on_worker_dead(1))
    cluster.run()
    assert "died" in cluster.failed["a"]
    assert cluster.blocks_used() == {0: 0}


def test_handoff_deadline_expires_into_an_abort(cluster):
    cluster.submit("a", [5, 6, 7, 8, 9])
    cluster.deliver(0)
    cluster.step(0)
    cluster.pump_front()
    cluster.apply(cluster.front.expire(now=1e9))
    assert "not admitted" in cluster.failed["a"]
    finish_and_check(cluster)


def test_requests_of_the_only_prefill_worker_wait_for_its_restart(cluster):
    """Migration with no live worker of the role parks the request until one is back."""
    cluster.submit("a", LONG)
    cluster.deliver(0)
    cluster.step(0)
    cluster.dead.add(0)
    cluster.apply(cluster.front.on_worker_dead(0, cluster.loads(), migrate=True))
    assert cluster.front.parked == ["a"] and "a" not in cluster.failed
    cluster.nodes[0].core.seqs.clear()  # the restarted process starts empty
    cluster.nodes[0].core.chunks.clear()
    cluster.nodes[0].ex.blocks.free("a/0")
    cluster.dead.discard(0)
    cluster.to_workers[0].clear()
    cluster.apply(cluster.front.unpark(cluster.loads(), cluster.now))
    assert cluster.front.parked == []
    finish_and_check(cluster, ["a"])


def test_a_parked_request_can_be_aborted(cluster):
    cluster.submit("a", LONG)
    cluster.dead.add(0)
    cluster.apply(cluster.front.on_worker_dead(0, cluster.loads(), migrate=True))
    cluster.abort("a")
    assert cluster.front.reqs == {} and cluster.front.parked == []


def _drive_to(c: Cluster, state: str) -> str:
    """Put request "a" in `state` (by its id "b" for QUEUED: behind a) and return its id."""
    if state == "QUEUED":
        c.submit("a", LONG)
        c.submit("b", LONG)
        return "b"
    c.submit("a", LONG if state in ("PREFILLING", "parked") else [5, 6, 7, 8, 9], max_tokens=50)
    if state == "parked":  # its only prefill worker died; migrated, nowhere to go
        c.deliver(0)
        c.step(0)
        c.dead.add(0)
        c.apply(c.front.on_worker_dead(0, c.loads(), migrate=True))
        assert c.front.parked == ["a"]
        return "a"
    if state == "mixed":
        c.deliver(0)
        c.step(0)
        return "a"
    c.deliver(0)
    c.step(0)
    if state == "PREFILLING":
        return "a"
    c.pump_front()  # Handoff ordered
    if state == "DECODING":
        c.deliver(1)
        c.step(1)
        c.pump_front()
    return "a"


@pytest.mark.parametrize("state", ["QUEUED", "PREFILLING", "AWAIT_DECODE", "DECODING", "parked", "mixed"])
def test_request_timeout_ends_a_request_in_every_state(default_model_dir, state):
    """--request-timeout-s (FrontConfig.request_timeout_s): past it a request ends with an
    error in whichever state it is, and every block it held anywhere is freed."""
    c = Cluster(default_model_dir, roles=("mixed",) if state == "mixed" else ("prefill", "decode"),
                request_timeout_s=5.0)
    req_id = _drive_to(c, state)
    req = c.front.reqs[req_id]
    if state in ReqState.__members__:
        assert req.state is ReqState[state]
    assert c.front.expire(now=req.arrival_s + 4.9).fails == []  # not before its deadline
    c.apply(c.front.expire(now=req.arrival_s + 5.1))  # well inside the 120 s handoff timeout
    assert c.failed == {r: "request exceeded its 5 s deadline" for r in c.failed} and req_id in c.failed
    assert set(c.failed) == ({"a", "b"} if state == "QUEUED" else {"a"})  # (QUEUED: a, ahead of it, too)
    finish_and_check(c)
    assert c.front.parked == []


def _run_until(c: Cluster, pred, max_rounds: int = 200) -> None:
    for _ in range(max_rounds):
        if pred():
            return
        for wid in c.nodes:
            if wid not in c.dead:
                c.deliver(wid)
                if c.nodes[wid].has_work():
                    c.step(wid)
        c.pump_front()
    raise AssertionError("condition never held")


def test_a_request_migrated_twice_continues_exactly_where_it_was(default_model_dir):
    """Its decode worker dies, then the prefill worker re-prefilling the continuation dies too
    (it parks until that one is back): the client still gets the unmigrated run's tokens,
    no more, no fewer. (A second migration used to fold the emitted tokens into the prompt
    again and take them off the budget again: a repeated prompt and a truncated output.)"""
    prompt = [5, 6, 7, 8, 9, 10]
    ref = Cluster(default_model_dir, roles=("prefill", "decode", "decode"))
    ref.submit("a", prompt, max_tokens=12)
    finish_and_check(ref, ["a"])
    c = Cluster(default_model_dir, roles=("prefill", "decode", "decode"))
    c.submit("a", prompt, max_tokens=12)
    _run_until(c, lambda: len(c.tokens["a"]) >= 4 and not c.to_front)
    first_decoder = c.front.reqs["a"].decode_worker
    c.dead.add(first_decoder)
    c.apply(c.front.on_worker_dead(first_decoder, c.loads(), migrate=True))
    assert c.front.reqs["a"].state is not ReqState.DECODING  # re-queued for prefill on worker 0
    assert c.blocks_used()[0] == 0
    c.dead.add(0)  # ... which dies before running it
    c.apply(c.front.on_worker_dead(0, c.loads(), migrate=True))
    assert c.front.parked == ["a"]
    c.dead.discard(0)  # restarted, empty
    c.to_workers[0].clear()
    c.apply(c.front.unpark(c.loads(), c.now))
    finish_and_check(c, ["a"])
    assert c.tokens["a"] == ref.tokens["a"] and len(ref.tokens["a"]) == 12


def test_every_node_publishes_its_max_num_seqs_on_the_board(cluster):
    """TetriDecode's slot test reads the row's max_num_seqs (0: unpublished, then it assumes its own)."""
    assert {load.max_num_seqs for load in cluster.loads()} == {cluster.nodes[0].sched.max_num_seqs}
    assert cluster.nodes[0].sched.max_num_seqs > 0


def _prefilled_with_no_decode_worker(c: Cluster) -> None:
    """The only decode worker dies before "a" is prefilled: the handoff parks."""
    c.dead.add(1)
    c.apply(c.front.on_worker_dead(1, c.loads(), migrate=True))
    c.submit("a", [5, 6, 7, 8, 9], max_tokens=6)
    c.deliver(0)
    c.step(0)
    c.pump_front()
    req = c.front.reqs["a"]
    assert "a" not in c.failed and req.state is ReqState.AWAIT_DECODE and req.decode_worker is None
    assert list(c.front.parked_handoffs) == ["a"] and c.blocks_used()[0] > 0  # the prefill copy waits


def test_a_prefilled_request_waits_for_a_decode_worker_and_equals_the_undisturbed_run(cluster, default_model_dir):
    ref = Cluster(default_model_dir)
    ref.submit("a", [5, 6, 7, 8, 9], max_tokens=6)
    finish_and_check(ref, ["a"])
    _prefilled_with_no_decode_worker(cluster)
    cluster.apply(cluster.front.unpark(cluster.loads(), cluster.now))  # still no decode worker: it stays
    assert list(cluster.front.parked_handoffs) == ["a"] and "a" not in cluster.failed
    cluster.dead.discard(1)  # restarted
    cluster.apply(cluster.front.unpark(cluster.loads(), cluster.now))
    assert cluster.front.parked_handoffs == {} and cluster.front.reqs["a"].decode_worker == 1
    finish_and_check(cluster, ["a"])
    assert cluster.tokens["a"] == ref.tokens["a"]


def test_a_parked_handoff_fails_at_its_deadline_and_frees_the_prefill_copy(cluster):
    _prefilled_with_no_decode_worker(cluster)
    cluster.apply(cluster.front.expire(cluster.now + 1.0))
    assert "a" not in cluster.failed
    cluster.apply(cluster.front.expire(cluster.now + cluster.front.cfg.handoff_timeout_s + 1.0))
    assert cluster.failed["a"].startswith("no live decode worker within")
    assert cluster.front.parked_handoffs == {}
    finish_and_check(cluster)


def test_a_parked_handoff_can_be_aborted_and_frees_the_prefill_copy(cluster):
    _prefilled_with_no_decode_worker(cluster)
    cluster.abort("a")
    assert cluster.front.parked_handoffs == {} and "a" not in cluster.failed
    finish_and_check(cluster)
