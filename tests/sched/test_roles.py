"""Adaptive roles: the pure RolePolicy (hysteresis, dwell, reasons, no role starved) and the
FlipPlan pieces it needs (flips to mixed in place, capability-aware minimums)."""

import dataclasses
import itertools
import random

import pytest

from tetri.sched.flip import FlipDecision, FlipPlan
from tetri.sched.load import WorkerLoad
from tetri.sched.roles import RolePolicy, decode_pressure

BUSY = 1000  # prefill_busy_tokens in these tests: pressure = queued / 1000


def row(wid, role, queued=0, running=0, waiting=0, free=100, step_s=0.0, state="ready"):
    return WorkerLoad(wid, role, state, queued_prefill_tokens=queued, running_reqs=running, waiting_reqs=waiting,
                      free_blocks=free, total_blocks=100, max_num_seqs=100, step_s=step_s)


def board(prefill_queued, decode_running, roles=("prefill", "prefill", "decode", "decode")):
    """Every prefill-capable worker with `prefill_queued` tokens, every decode-capable with
    `decode_running` requests (of 100 slots)."""
    return [row(i, r, queued=prefill_queued if r != "decode" else 0,
                running=decode_running if r != "prefill" else 0) for i, r in enumerate(roles)]


def test_load_oscillating_inside_the_band_never_flips():
    policy = RolePolicy(BUSY, high=0.8, room=0.5, dwell_s=1.0, worker_dwell_s=5.0)
    for step in range(600):  # 60 s at 0.1 s ticks: prefill 0.55..0.75, decode 0.55..0.75
        swing = 550 + 200 * (step % 7) // 6
        assert policy.decide(board(swing, swing // 10), step * 0.1) is None


def test_spikes_shorter_than_the_dwell_do_not_flip():
    policy = RolePolicy(BUSY, dwell_s=1.0)
    for step in range(300):  # starved for 0.5 s, then calm for 0.5 s, over and over
        starved = (step // 5) % 2 == 0
        assert policy.decide(board(900 if starved else 100, 10), step * 0.1) is None


def test_crossing_the_band_flips_one_step_with_the_reason():
    policy = RolePolicy(BUSY, high=0.8, room=0.5, dwell_s=1.0)
    loads = board(900, 10)
    assert policy.decide(loads, 0.0) is None
    assert policy.decide(loads, 0.4) is None
    d = policy.decide(loads, 0.5)  # a move to mixed drains nothing: half the hold
    assert (d.worker_id, d.from_role, d.to_role) == (2, "decode", "mixed")  # decode -> mixed first: no drain
    assert d.reason == ("prefill starved for 0.5 s: prefill pressure 0.90 >= 0.8 while decode pressure 0.10 < 0.5; "
                        "worker 2 decode -> mixed")
    assert policy.decide(loads, 0.6) is None  # the hold restarts after a decision
    drain = [row(0, "mixed", queued=900, running=5), row(1, "mixed", queued=900, running=5)]
    policy = RolePolicy(BUSY, high=0.8, room=0.5, dwell_s=1.0)
    assert policy.decide(drain, 2.0) is None and policy.decide(drain, 2.9) is None
    d = policy.decide(drain, 3.0)  # a move out of mixed drains: the full hold
    assert (d.from_role, d.to_role) == ("mixed", "prefill") and "starved for 1.0 s" in d.reason
    # decode starved, prefill has room: a prefill worker becomes mixed
    policy = RolePolicy(BUSY, dwell_s=0.0)
    d = policy.decide(board(100, 95), 0.0)
    assert (d.from_role, d.to_role) == ("prefill", "mixed") and d.reason.startswith("decode starved")


def test_from_mixed_picks_the_least_to_drain_and_both_starved_only_moves_to_mixed():
    policy = RolePolicy(BUSY, dwell_s=0.0)
    loads = [row(0, "mixed", queued=900, running=30), row(1, "mixed", queued=950, running=5),
             row(2, "mixed", queued=900, running=20)]
    d = policy.decide(loads, 0.0)
    assert (d.worker_id, d.from_role, d.to_role) == (1, "mixed", "prefill")
    both = [row(0, "prefill", queued=5000), row(1, "prefill", queued=4000), row(2, "decode", running=90)]
    d = RolePolicy(BUSY, dwell_s=0.0).decide(both, 0.0)
    assert (d.worker_id, d.to_role) == (1, "mixed") and d.reason.startswith("both starved")
    d = RolePolicy(BUSY, dwell_s=0.0).decide([row(0, "mixed", queued=5000, running=90),
                                              row(1, "decode", running=90)], 0.0)
    assert (d.worker_id, d.from_role, d.to_role) == (1, "decode", "mixed")  # no prefill worker left: a decode one
    assert RolePolicy(BUSY, dwell_s=0.0).decide([row(0, "mixed", queued=5000, running=90),
                                                 row(1, "mixed", queued=5000, running=90)], 0.0) is None  # no drain


def test_no_drain_that_would_starve_the_side_losing_the_worker():
    policy = RolePolicy(BUSY, dwell_s=0.0)
    # decode starved, prefill at 0.3 over two mixed workers: one leaving puts 0.6 on the other
    loads = [row(0, "mixed", queued=300, running=90), row(1, "mixed", queued=300, running=90),
             row(2, "decode", running=90)]
    assert policy.decide(loads, 0.0) is None
    lighter = [row(0, "mixed", queued=200, running=90), row(1, "mixed", queued=200, running=90),
               row(2, "decode", running=90)]
    d = policy.decide(lighter, 1.0)  # 0.2 x 2 / 1 = 0.4 < 0.5
    assert (d.from_role, d.to_role) == ("mixed", "decode")


def test_a_worker_that_flipped_waits_its_dwell():
    policy = RolePolicy(BUSY, dwell_s=0.0, worker_dwell_s=10.0)
    d = policy.decide([row(0, "mixed", queued=900, running=5), row(1, "decode", running=5),
                       row(2, "decode", running=5)], 0.0)
    assert (d.worker_id, d.to_role) == (1, "mixed")
    d = policy.decide([row(0, "mixed", queued=900, running=5), row(1, "mixed", queued=900, running=1),
                       row(2, "decode", running=5)], 1.0)
    assert (d.worker_id, d.to_role) == (2, "mixed")
    starved = [row(0, "mixed", queued=900, running=5), row(1, "mixed", queued=900, running=1),
               row(2, "mixed", queued=900, running=1)]
    d = policy.decide(starved, 2.0)
    assert (d.worker_id, d.to_role) == (0, "prefill")  # 1 and 2 hold fewer, but flipped under 10 s ago
    later = [row(0, "prefill", queued=900), *starved[1:]]
    assert policy.decide(later, 10.5).worker_id == 1  # worker 1's dwell (from t=0) is over


def test_decode_pace_against_the_declared_tpot():
    assert decode_pressure(row(0, "decode", running=10, step_s=0.020), tpot_s=0.025) == pytest.approx(0.8)
    assert decode_pressure(row(0, "decode", running=10, step_s=0.020)) == pytest.approx(0.1)
    assert decode_pressure(row(0, "decode", running=0, step_s=0.020), tpot_s=0.025) == 0.0  # nothing decoding
    policy = RolePolicy(BUSY, dwell_s=0.0, tpot_s=0.025)
    pace = [row(0, "prefill", queued=300), row(1, "prefill", queued=100), row(2, "decode", running=10, step_s=0.024)]
    d = policy.decide(pace, 0.0)
    assert (d.worker_id, d.to_role) == (1, "mixed") and "decode pressure 0.96" in d.reason
    assert RolePolicy(BUSY, dwell_s=0.0).decide(pace, 0.0) is None  # no declared TPOT: 10 of 100 slots is room


def test_never_a_decision_that_leaves_no_worker_able_to_prefill_or_decode():
    rng = random.Random(0)
    roles = {0: "prefill", 1: "decode", 2: "mixed"}
    policy = RolePolicy(BUSY, dwell_s=0.0, worker_dwell_s=0.0)
    decisions = 0
    for t in range(2000):
        loads = [row(w, r, queued=rng.choice([0, 300, 900, 5000]) if r != "decode" else 0,
                     running=rng.choice([0, 10, 60, 100]) if r != "prefill" else 0) for w, r in roles.items()]
        d = policy.decide(loads, float(t))
        if d is None:
            continue
        decisions += 1
        assert d.from_role == roles[d.worker_id] and d.reason
        roles[d.worker_id] = d.to_role
        assert any(r in ("prefill", "mixed") for r in roles.values()), roles
        assert any(r in ("decode", "mixed") for r in roles.values()), roles
    assert decisions > 20  # it did move workers around


def test_flip_plan_flips_to_mixed_in_place_and_drains_the_rest():
    plan = FlipPlan({0: "prefill", 1: "decode", 2: "decode"}, in_place_to_mixed=True)
    plan.on_dispatch("a", 1)
    assert plan.begin(FlipDecision(1, "decode", "mixed"))
    assert plan.poll() == [FlipDecision(1, "decode", "mixed")]  # owns "a" and flips anyway
    assert plan.on_flipped(1) and plan.role_of(1) == "mixed" and plan.outstanding(1) == {"a"}
    assert plan.begin(FlipDecision(1, "mixed", "prefill"))
    assert plan.poll() == []  # a flip away from mixed drains
    plan.on_done("a", 1)
    assert plan.poll() == [FlipDecision(1, "mixed", "prefill")]
    drains = FlipPlan({0: "prefill", 1: "decode", 2: "decode"})
    drains.on_dispatch("b", 1)
    assert drains.begin(FlipDecision(1, "decode", "mixed")) and drains.poll() == []  # default: every flip drains


def test_flip_plan_counts_mixed_workers_as_able_to_do_both():
    plan = FlipPlan({0: "mixed", 1: "decode"})
    assert not plan.begin(FlipDecision(0, "mixed", "decode"))  # the only worker able to prefill
    assert plan.begin(FlipDecision(1, "decode", "prefill"))  # worker 0 still decodes
    plan = FlipPlan({0: "prefill", 1: "mixed"})
    assert plan.begin(FlipDecision(0, "prefill", "decode"))


def test_without_mixed_handoffs_no_decode_worker_is_left_unfed():
    """tetri-serve's mixed workers keep what they prefill: from all-mixed, a decode-starved
    load may not turn a worker into a decode worker no prefill worker would feed (the sim's,
    which hand off, may); a prefill-starved one may still make a prefill worker."""
    decode_starved = [row(0, "mixed", running=90), row(1, "mixed", running=90)]
    moves = {}
    for hands_off in (True, False):
        policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=0.0, mixed_hands_off=hands_off)
        moves[hands_off] = [policy.decide(decode_starved, t * 0.5) for t in range(4)]
    assert any(d is not None and d.to_role == "decode" for d in moves[True])
    assert all(d is None for d in moves[False])
    policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=0.0, mixed_hands_off=False)
    prefill_starved = [row(0, "mixed", queued=950), row(1, "mixed", queued=950)]
    decisions = [policy.decide(prefill_starved, t * 0.5) for t in range(4)]
    assert [(d.from_role, d.to_role) for d in decisions if d] == [("mixed", "prefill")]
    # and from prefill + decode + mixed, decode-starved: the prefill worker may not go mixed
    # while a decode worker would be left with no prefill worker
    rows = [row(0, "prefill"), row(1, "mixed", running=95), row(2, "decode", running=95)]
    policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=0.0, mixed_hands_off=False)
    decisions = [policy.decide(rows, t * 0.5) for t in range(4)]
    assert all(d is None or d.worker_id != 0 for d in decisions)


def test_prefill_interference_on_all_mixed_splits_toward_prefill_plus_decode():
    """tetri-serve (mixed workers keep what they prefill), all-mixed, decode slow by pace alone
    (step_s near the declared TPOT, slots and blocks nearly empty): the policy splits off a
    prefill worker, then turns the other mixed worker into a decode worker, never back to mixed
    for the prefill worker (that would add interference). Occupancy, not pace: no split."""
    policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=10.0, tpot_s=0.1, mixed_hands_off=False)
    slow = [row(0, "mixed", queued=100, running=6, step_s=0.09), row(1, "mixed", queued=50, running=4, step_s=0.09),
            row(2, "mixed", queued=80, running=7, step_s=0.09)]
    decisions = [policy.decide(slow, t * 0.5) for t in range(4)]
    moves = [(d.worker_id, d.from_role, d.to_role) for d in decisions if d]
    assert moves == [(1, "mixed", "prefill")]  # fewest requests: least to drain
    assert "prefill interference" in next(d for d in decisions if d).reason
    # then a mixed worker (the shortest prompt queue) becomes the decode worker
    split = [row(0, "mixed", queued=100, running=8, step_s=0.09), row(1, "prefill", queued=100),
             row(2, "mixed", queued=20, running=5, step_s=0.09)]
    decisions = [policy.decide(split, 2.0 + t * 0.5) for t in range(4)]
    assert [(d.worker_id, d.from_role, d.to_role) for d in decisions if d] == [(2, "mixed", "decode")]
    # two workers split the same way (flips out of mixed are in place: the last mixed worker
    # needs no drain), and no prefill worker is turned mixed again (that would add interference)
    for two, want in ((slow[:2], (1, "mixed", "prefill")), (split[:2], (0, "mixed", "decode"))):
        fresh = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=10.0, tpot_s=0.1, mixed_hands_off=False)
        decisions = [fresh.decide(two, t * 0.5) for t in range(4)]
        assert [(d.worker_id, d.from_role, d.to_role) for d in decisions if d] == [want]
        assert "prefill interference" in next(d for d in decisions if d).reason
    # the same slow pace with the slots nearly full is decode load, not interference: no drain
    full = [row(i, "mixed", queued=50, running=90, step_s=0.09) for i in range(3)]
    fresh = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=10.0, tpot_s=0.1, mixed_hands_off=False)
    assert all(fresh.decide(full, t * 0.5) is None for t in range(4))
    # slow by pace with no prompt queued on the mixed workers: the decodes' own, so the line's
    # move (the prefill worker turns mixed, in place) and no interference split
    decodes = [row(0, "mixed", running=8, step_s=0.09), row(1, "prefill")]
    fresh = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=10.0, tpot_s=0.1, mixed_hands_off=False)
    decisions = [fresh.decide(decodes, t * 0.5) for t in range(4)]
    assert [(d.worker_id, d.to_role) for d in decisions if d] == [(1, "mixed")]


def mixed_row(wid, role, queued=0, running=0, step_s=0.03, steps=0):
    return WorkerLoad(wid, role, queued_prefill_tokens=queued, running_reqs=running, free_blocks=90,
                      total_blocks=100, max_num_seqs=100, step_s=step_s, interleaved_steps=steps)


def test_light_load_splits_all_mixed_into_prefill_plus_decode_one_step_at_a_time():
    """Two mixed workers (tetri-serve: they keep what they prefill) at light load, interleaving
    prompts with decodes: held for in_place_dwell_s, mixed -> prefill (fewest requests), then the other
    mixed -> decode; with no interleaving seen, or with a side that would lose its room, no split."""
    policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=10.0, tpot_s=0.1, mixed_hands_off=False)
    decisions = []
    roles = {0: "mixed", 1: "mixed"}
    for step in range(40):  # 4 s at 0.1 s ticks; the mixed steps that interleave count up
        loads = [mixed_row(0, roles[0], queued=0, running=6 if roles[0] == "mixed" else 0, steps=step),
                 mixed_row(1, roles[1], queued=0, running=3, steps=step)]
        d = policy.decide(loads, step * 0.1)
        if d is not None:
            decisions.append(d)
            roles[d.worker_id] = d.to_role
    assert [(d.worker_id, d.from_role, d.to_role) for d in decisions] == [(1, "mixed", "prefill"), (0, "mixed", "decode")]
    assert decisions[0].reason.startswith("split after 0.5 s of light load")  # in place: half the hold
    assert "worker 1 mixed -> prefill" in decisions[0].reason
    # no prompt ever interleaved (queued 0, the counter still): nothing to gain, no split
    quiet = [mixed_row(0, "mixed", running=6), mixed_row(1, "mixed", running=3)]
    policy = RolePolicy(BUSY, dwell_s=1.0, tpot_s=0.1, mixed_hands_off=False)
    assert all(policy.decide(quiet, k * 0.1) is None for k in range(40))
    # ...but a snapshot with prompts queued behind decodes is evidence too
    busy = [mixed_row(0, "mixed", queued=100, running=6), mixed_row(1, "mixed", running=3)]
    policy = RolePolicy(BUSY, dwell_s=1.0, tpot_s=0.1, mixed_hands_off=False)
    assert [d.to_role for d in (policy.decide(busy, k * 0.1) for k in range(8)) if d] == ["prefill"]
    # decode occupancy 0.3 over two: 0.6 on the one left >= room; prefill pressure 0.3 on the
    # second step likewise: no split
    full = [mixed_row(0, "mixed", queued=100, running=30, steps=1), mixed_row(1, "mixed", queued=100, running=30)]
    policy = RolePolicy(BUSY, dwell_s=1.0, tpot_s=0.1, mixed_hands_off=False)
    assert all(policy.decide(full, k * 0.1) is None for k in range(40))
    half = [mixed_row(0, "prefill", queued=300), mixed_row(1, "mixed", queued=300, running=5, steps=9)]
    policy = RolePolicy(BUSY, dwell_s=1.0, tpot_s=0.1, mixed_hands_off=False)
    assert all(policy.decide(half, k * 0.1) is None for k in range(40))


def test_split_and_merge_cannot_oscillate():
    """Closed loop: the load (prompt tokens and decodes per worker) follows the roles; at every
    steady level the policy settles (at most the two split steps, or one merge), never back
    and forth: the split needs every side's pressure after it < room, the merge one >= high."""
    levels = [(0, 6), (200, 10), (500, 20), (700, 40), (1200, 60), (2000, 100), (400, 160), (1700, 30)]
    seen = set()
    for (queued_total, running_total), start in itertools.product(levels, [("mixed", "mixed"), ("prefill", "decode")]):
        policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=2.0, tpot_s=0.1, mixed_hands_off=False)
        roles = dict(enumerate(start))
        moves = []
        for k in range(600):  # 60 s
            p_rows = [w for w, r in roles.items() if r != "decode"]
            d_rows = [w for w, r in roles.items() if r != "prefill"]
            loads = [mixed_row(w, r, queued=queued_total // len(p_rows) if w in p_rows else 0,
                               running=running_total // len(d_rows) if w in d_rows else 0, steps=k)
                     for w, r in roles.items()]
            d = policy.decide(loads, k * 0.1)
            if d is not None:
                moves.append((d.from_role, d.to_role))
                roles[d.worker_id] = d.to_role
        assert len(moves) <= 2, (queued_total, running_total, moves)
        splits = [m for m in moves if m[0] == "mixed"]
        merges = [m for m in moves if m[1] == "mixed"]
        assert not (splits and merges), (queued_total, running_total, moves)
        seen.update(moves)
    assert {("mixed", "prefill"), ("mixed", "decode"), ("prefill", "mixed")} <= seen  # both moves were exercised


def test_the_split_stops_at_one_prefill_and_one_decode_worker():
    policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=10.0, tpot_s=0.1, mixed_hands_off=False)
    roles = dict.fromkeys(range(4), "mixed")
    for k in range(100):
        loads = [mixed_row(w, r, queued=0, running=0 if r == "prefill" else 4, steps=k) for w, r in roles.items()]
        d = policy.decide(loads, k * 0.1)
        if d is not None:
            roles[d.worker_id] = d.to_role
    assert sorted(roles.values()) == ["decode", "mixed", "mixed", "prefill"]


def test_no_split_while_prompts_keep_the_prefill_side_busy():
    """Short queues, empty slots, prompts interleaved, but the mixed workers spend 60% of their
    time on prompt tokens (`prefill_busy_s` grows 0.6 s per second): the side would lack
    capacity after a split, so none; at 20% it splits."""
    for busy, want in ((0.6, []), (0.2, ["prefill"])):
        policy = RolePolicy(BUSY, dwell_s=1.0, tpot_s=0.1, mixed_hands_off=False)
        moves = []
        for k in range(30):
            loads = [dataclasses.replace(mixed_row(w, "mixed", running=3, steps=k), prefill_busy_s=busy * k * 0.1)
                     for w in (0, 1)]
            d = policy.decide(loads, k * 0.1)
            if d is not None:
                moves.append(d.to_role)
                break
        assert moves == want, busy


def test_prefill_plus_decode_returns_to_all_mixed_when_decode_starves():
    """1 prefill + 1 decode (the split's end on two workers) under decode starvation: the
    prefill worker may not go mixed first (the decode worker would go unfed), so the decode
    worker goes mixed first, then the prefill worker: all-mixed, both decoding."""
    policy = RolePolicy(BUSY, dwell_s=1.0, worker_dwell_s=0.0, mixed_hands_off=False)
    rows = [row(0, "prefill"), row(1, "decode", running=95)]
    decisions = [d for d in (policy.decide(rows, t * 0.5) for t in range(4)) if d]  # the board unchanged
    assert {(d.worker_id, d.from_role, d.to_role) for d in decisions} == {(1, "decode", "mixed")}
    assert decisions[0].reason.startswith("decode starved")
    rows = [row(0, "prefill"), row(1, "mixed", running=95)]
    decisions = [d for d in (policy.decide(rows, 2.0 + t * 0.5) for t in range(4)) if d]
    assert {(d.worker_id, d.from_role, d.to_role) for d in decisions} == {(0, "prefill", "mixed")}
