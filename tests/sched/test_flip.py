"""Instance flip: the trigger policy and the drain -> flip -> resume state machine."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetri.sched.flip import ACTIVE, DRAINING, FLIPPED, FlipDecision, FlipError, FlipPlan, FlipPolicy
from tetri.sched.load import WorkerLoad


def prefill(wid, queued=0, state="ready"):
    return WorkerLoad(wid, "prefill", state, queued_prefill_tokens=queued)


def decode(wid, free=0, total=100, waiting=0, running=10, state="ready"):
    return WorkerLoad(wid, "decode", state, running_reqs=running, waiting_reqs=waiting, free_blocks=free,
                      total_blocks=total)


def test_prefill_to_decode_after_window():
    policy = FlipPolicy(idle_threshold=0.1, window_s=5.0)
    loads = [prefill(0, queued=0), prefill(1, queued=100), decode(2, free=2), decode(3, waiting=3, free=50)]
    assert policy.decide(loads, 0.0) is None
    assert policy.decide(loads, 4.9) is None
    assert policy.decide(loads, 5.0) == FlipDecision(0, "prefill", "decode")
    assert policy.decide(loads, 6.0) is None  # window restarts after a decision


def test_decode_to_prefill_and_reset_when_condition_breaks():
    policy = FlipPolicy(window_s=2.0)
    idle_decode = [prefill(0, queued=5000), decode(1, free=100, running=0), decode(2, free=95, running=1)]
    assert policy.decide(idle_decode, 0.0) is None
    busy = [prefill(0, queued=5000), decode(1, free=0), decode(2, free=0)]
    assert policy.decide(busy, 1.0) is None  # breaks the streak
    assert policy.decide(idle_decode, 2.0) is None
    assert policy.decide(idle_decode, 4.0) == FlipDecision(1, "decode", "prefill")


def test_no_flip_that_empties_a_role_or_while_draining():
    policy = FlipPolicy(window_s=0.0)
    assert policy.decide([prefill(0), decode(1, free=0)], 0.0) is None  # lone prefill worker
    loads = [prefill(0), prefill(1), decode(2, free=0), prefill(3, state="draining")]
    assert policy.decide(loads, 0.0) is None


rows = st.lists(st.tuples(st.sampled_from(["prefill", "decode", "mixed"]), st.integers(0, 5000),
                          st.integers(0, 100), st.integers(0, 3), st.sampled_from(["ready", "ready", "dead"])),
                min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(rows, min_size=1, max_size=6), st.integers(1, 2))
def test_decide_never_leaves_role_below_minimum(board_seq, min_workers):
    policy = FlipPolicy(window_s=1.0, min_workers_per_role=min_workers)
    for t, board in enumerate(board_seq):
        loads = [WorkerLoad(i, role, state, queued_prefill_tokens=q, free_blocks=f, total_blocks=100,
                            waiting_reqs=w) for i, (role, q, f, w, state) in enumerate(board)]
        decision = policy.decide(loads, float(t))
        if decision is not None:
            donor = [w for w in loads if w.state == "ready" and w.role == decision.from_role]
            assert decision.worker_id in {w.worker_id for w in donor}
            assert len(donor) - 1 >= min_workers
            assert decision.to_role != decision.from_role


ops = st.lists(st.tuples(st.sampled_from(["dispatch", "done", "begin", "poll", "ack", "cancel"]),
                         st.integers(0, 4), st.sampled_from(["prefill", "decode"])), max_size=60)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["prefill", "decode"]), min_size=2, max_size=5), ops)
def test_plan_never_drops_or_duplicates(roles, events):
    plan = FlipPlan(dict(enumerate(roles)), min_workers_per_role=1)
    owner: dict[str, int] = {}  # req -> worker, from dispatch to done
    finished: list[str] = []
    next_req = 0
    had_active = set(roles)
    for op, k, role in events:
        wid = k % len(roles)
        if op == "dispatch":
            targets = plan.active_workers(role)
            if targets:
                req = f"r{next_req}"
                next_req += 1
                target = targets[k % len(targets)]
                plan.on_dispatch(req, target)
                owner[req] = target
        elif op == "done" and owner:
            req = sorted(owner)[k % len(owner)]
            assert plan.on_done(req, owner.pop(req))
            finished.append(req)
        elif op == "begin":
            before = {r: len(plan.active_workers(r)) for r in ("prefill", "decode")}
            was_active = plan.state_of(wid) == ACTIVE
            other = "decode" if plan.role_of(wid) == "prefill" else "prefill"
            started = plan.begin(FlipDecision(wid, plan.role_of(wid), other))
            assert started == (was_active and before[plan.role_of(wid)] >= 2)
            assert not started or plan.state_of(wid) == DRAINING
        elif op == "poll":
            for order in plan.poll():
                assert not any(w == order.worker_id for w in owner.values())  # empty before the role change
                assert plan.state_of(order.worker_id) == FLIPPED
        elif op == "ack":
            plan.on_flipped(wid)
        elif op == "cancel":
            plan.cancel(wid)
        for r in ("prefill", "decode"):  # a role that had an active worker never loses its last
            if plan.active_workers(r):
                had_active.add(r)
            assert r not in had_active or plan.active_workers(r)
        for w in range(len(roles)):
            assert set(plan.outstanding(w)) == {q for q, o in owner.items() if o == w}
            if plan.state_of(w) != ACTIVE:
                assert not plan.can_dispatch(w)
    # wind down: every request still owned completes exactly once, then every drain finishes
    for req, w in sorted(owner.items()):
        assert plan.on_done(req, w)
        finished.append(req)
    assert len(finished) == len(set(finished)) == next_req
    plan.poll()
    for w in range(len(roles)):
        if plan.state_of(w) == FLIPPED:
            assert plan.on_flipped(w)
    assert all(plan.state_of(w) == ACTIVE for w in range(len(roles)))


def test_plan_role_counts_never_hit_zero_in_flight():
    plan = FlipPlan({0: "prefill", 1: "prefill", 2: "decode"})
    assert plan.begin(FlipDecision(0, "prefill", "decode"))
    assert not plan.begin(FlipDecision(1, "prefill", "decode"))  # would leave no active prefill
    assert not plan.begin(FlipDecision(2, "decode", "prefill"))
    plan.on_dispatch("a", 1)
    with pytest.raises(FlipError, match="not accepting dispatch"):  # to a draining worker: a caller bug
        plan.on_dispatch("b", 0)


def test_plan_view_and_poll_waits_for_load_row():
    plan = FlipPlan({0: "prefill", 1: "prefill", 2: "decode"})
    plan.begin(FlipDecision(0, "prefill", "decode"))
    board = [prefill(0, queued=10), prefill(1), decode(2)]
    viewed = plan.view(board)
    assert viewed[0].state == "draining" and not viewed[0].accepting and viewed[1].accepting
    assert plan.poll(board) == []  # the row still shows queued prompt tokens
    board[0] = prefill(0)
    assert plan.poll(board) == [FlipDecision(0, "prefill", "decode")]
    assert plan.on_flipped(0)
    assert plan.view(board)[0].role == "decode" and plan.view(board)[0].accepting
