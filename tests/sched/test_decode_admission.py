"""Decode-worker admission and batch selection: greedy, reserve-static, reserve-dynamic, mlfq."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetri.sched.decode_policy import (DecodeReqView, GreedyDecodePolicy, ReserveDynamicPolicy, ReserveStaticPolicy,
                                       admit_need_blocks, predicted_remaining_tokens)
from tetri.sched.decode_registry import DECODE_POLICIES, make_decode_policy
from tetri.sched.kv_blocks import blocks_for_tokens


def view(req_id, context, generated=0, max_tokens=1000, predicted=None, held=0, arrival_s=0.0):
    return DecodeReqView(req_id, context, generated, max_tokens, predicted, arrival_s, held)


def test_factory_names_and_greedy_unchanged():
    assert {make_decode_policy(n).name for n in DECODE_POLICIES} == set(DECODE_POLICIES)
    assert isinstance(make_decode_policy("greedy"), GreedyDecodePolicy)
    with pytest.raises(ValueError):
        make_decode_policy("lifo")
    with pytest.raises(TypeError):
        make_decode_policy("greedy", starvation_s=1.0)
    g = GreedyDecodePolicy()
    waiting = [view("a", 31), view("b", 16), view("c", 1)]
    assert g.admit(waiting, [], 4, 16, 0.0) == ["a", "b"]  # stops at the first that does not fit
    g.on_step(["a"], 1.0)
    g.forget("a")


def test_predicted_remaining_tokens():
    assert predicted_remaining_tokens(view("a", 10)) == 1
    assert predicted_remaining_tokens(view("a", 10, generated=5, predicted=200)) == 195
    assert predicted_remaining_tokens(view("a", 10, generated=300, predicted=200)) == 1
    assert predicted_remaining_tokens(view("a", 10, generated=0, max_tokens=50, predicted=200)) == 50


def test_reserve_static_needs_predicted_footprint():
    req = view("a", context=100, predicted=400)  # needs ceil(500/16) = 32 blocks
    assert GreedyDecodePolicy().admit([req], [], 10, 16, 0.0) == ["a"]
    assert ReserveStaticPolicy().admit([req], [], 31, 16, 0.0) == []
    assert ReserveStaticPolicy().admit([req], [], 32, 16, 0.0) == ["a"]
    no_pred = view("b", context=100)
    assert ReserveStaticPolicy().admit([no_pred], [], 7, 16, 0.0) == ["b"]  # greedy's view


def test_reserve_dynamic_accounts_for_running_growth():
    # one running job with 10 blocks held, 160 context, 320 more tokens predicted: by the time
    # the shortest job finishes it grows a lot; static ignores that, dynamic does not.
    running = [view("r", context=160, predicted=320, held=10)]
    cand = view("c", context=16, predicted=400)
    # static: 26 blocks for the candidate fit in 30 free
    assert ReserveStaticPolicy().admit([cand], running, 30, 16, 0.0) == ["c"]
    # dynamic: T = min(320, 400) = 320 steps; r needs ceil(480/16)=30 (20 more), c ceil(336/16)=21
    assert ReserveDynamicPolicy().admit([cand], running, 30, 16, 0.0) == []
    assert ReserveDynamicPolicy().admit([cand], running, 41, 16, 0.0) == ["c"]
    # a short-lived running job makes the horizon short, so dynamic admits where static refuses
    short = [view("s", context=160, generated=9, predicted=10, held=10)]
    assert ReserveDynamicPolicy().admit([cand], short, 5, 16, 0.0) == ["c"]
    assert ReserveStaticPolicy().admit([cand], short, 5, 16, 0.0) == []


views = st.builds(
    lambda i, ctx, gen, pred, held_frac: view(f"q{i}", ctx, min(gen, ctx - 1), max_tokens=2048, predicted=pred,
                                              held=held_frac * blocks_for_tokens(ctx, 16) // 4),
    st.integers(0, 10**6), st.integers(1, 800), st.integers(0, 400), st.one_of(st.none(), st.integers(0, 1200)),
    st.integers(0, 4))


def _unique(reqs):
    return [DecodeReqView(f"{r.req_id}_{i}", *[getattr(r, f) for f in
                          ("context_tokens", "generated_tokens", "max_tokens", "predicted_output_tokens",
                           "arrival_s", "held_blocks")]) for i, r in enumerate(reqs)]


@settings(max_examples=80, deadline=None)
@given(st.lists(views, max_size=8), st.lists(views, max_size=6), st.integers(0, 120),
       st.sampled_from(DECODE_POLICIES), st.sampled_from([1, 16]))
def test_admit_never_overcommits(waiting, running, free_blocks, name, block_size):
    waiting = _unique(waiting)
    running = [DecodeReqView("run_" + r.req_id, r.context_tokens, r.generated_tokens, r.max_tokens,
                             r.predicted_output_tokens, r.arrival_s, blocks_for_tokens(r.context_tokens, block_size))
               for r in _unique(running)]
    policy = make_decode_policy(name)
    admitted = policy.admit(waiting, running, free_blocks, block_size, 0.0)
    by_id = {r.req_id: r for r in waiting}
    assert len(set(admitted)) == len(admitted) and set(admitted) <= set(by_id)
    assert sum(admit_need_blocks(by_id[i], block_size) for i in admitted) <= free_blocks


@settings(max_examples=80, deadline=None)
@given(st.lists(views, max_size=10), st.integers(0, 40), st.integers(1, 6), st.sampled_from(DECODE_POLICIES))
def test_schedule_fits_growth(running, free_blocks, max_seqs, name):
    running = _unique(running)
    policy = make_decode_policy(name)
    run, preempt = policy.schedule(running, max_seqs, free_blocks, 16, 0.0)
    by_id = {r.req_id: r for r in running}
    assert not set(run) & set(preempt) and len(run) <= max_seqs
    assert set(run) | set(preempt) <= set(by_id)
    freed = sum(by_id[i].held_blocks for i in preempt)
    growth = sum(1 for i in run if by_id[i].context_tokens + 1 > by_id[i].held_blocks * 16)
    assert growth <= free_blocks + freed
