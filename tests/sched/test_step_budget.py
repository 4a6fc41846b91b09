"""The SLO-aware step budget (tetri.sched.step_budget): pure policy, fed synthetic step costs."""

import random

import pytest

from tetri.sched.step_budget import MixedStep, StepBudget, make_step_budget

CHUNK = 512


def linear_cost(prompt_tokens, decode_reqs, context_tokens):
    """A GPU-like step: 3 ms base, 25 us per prompt token, 30 us per decode, 40 ns per context token."""
    return 3e-3 + 25e-6 * prompt_tokens + 30e-6 * decode_reqs + 40e-9 * context_tokens


def trained(tpot_s, steps=300, seed=0, cost=linear_cost):
    """A budget fed by a closed loop: each step packs what the budget allows (the queue is deep,
    or runs short at random) beside a random decode batch, and reports the cost."""
    rng = random.Random(seed)
    b = StepBudget(CHUNK, tpot_s)
    for _ in range(steps):
        n = rng.randrange(0, 200)
        ctx = n * rng.randrange(100, 3000)
        p = b.budget(n, ctx) if rng.random() < 0.7 else rng.randrange(1, 4 * CHUNK)
        b.observe(MixedStep(p, n, ctx), cost(p, n, ctx))
    return b


def test_no_slo_is_the_fixed_chunk():
    for b in (StepBudget.fixed(CHUNK), make_step_budget("slo", CHUNK, None), make_step_budget("fixed", CHUNK, 0.05)):
        assert not b.adaptive
        b.observe(MixedStep(CHUNK, 10, 1000), 1.0)
        assert [b.budget(n, 1000 * n) for n in (0, 50, 500)] == [CHUNK] * 3


def test_first_steps_before_any_measurement_take_about_the_chunk():
    b = StepBudget(CHUNK, 0.05)
    assert b.budget(0, 0) == CHUNK
    # the prior: a chunk_size step (a decode counts as a prompt token) takes 0.8 x the SLO, so
    # the SLO itself holds 1.25 x CHUNK = 640 tokens: the chunk beside 100 decodes, 240 beside 400
    assert b.budget(100, 0) == CHUNK
    assert abs(b.budget(400, 0) - 240) <= 1


@pytest.mark.parametrize("tpot_s", [0.05, 0.025])
def test_budget_meets_the_target_on_a_linear_cost(tpot_s):
    """Above the chunk: the largest step within 0.8 x the SLO; below it: the chunk, cut only as
    far as a step within the SLO itself needs."""
    b = trained(tpot_s)
    grown = held = 0
    for n, ctx in [(0, 0), (32, 32 * 800), (128, 128 * 1500), (64, 64 * 4000), (150, 150 * 2500),
                   (180, 180 * 3000), (100, 100 * 1000)]:
        p = b.budget(n, ctx)
        if linear_cost(0, n, ctx) > tpot_s:  # the decodes alone break the SLO: the chunk's pace
            assert p == CHUNK
            continue
        target = 0.8 * tpot_s if p > CHUNK else tpot_s
        assert linear_cost(p, n, ctx) <= target * 1.01, (n, ctx, p)
        if p > CHUNK:
            grown += 1
            if p < b.max_tokens:  # the largest that fits: 3% more would not
                assert linear_cost(p * 1.03 + 1, n, ctx) > target, (n, ctx, p)
        elif p < CHUNK:
            held += 1
            assert linear_cost(p * 1.03 + 1, n, ctx) > target, (n, ctx, p)
        else:  # the chunk itself fits the SLO, but more would break the margin
            assert linear_cost(CHUNK, n, ctx) <= tpot_s * 1.01 and linear_cost(CHUNK * 1.03, n, ctx) > 0.8 * tpot_s
    assert grown >= 2 and (held >= 1 or tpot_s == 0.05)


def test_the_budget_follows_the_slo():
    loose, tight = trained(0.05), trained(0.025)
    for n in (0, 40, 120):
        assert loose.budget(n, n * 1000) > tight.budget(n, n * 1000) * 1.5
    # 40 ms target, nothing else in the step: (0.040 - 0.003) / 25e-6 = 1480 tokens, > 2 x CHUNK
    assert 1400 <= loose.budget(0, 0) <= 1500


def test_budget_shrinks_as_decodes_grow():
    b = trained(0.05)
    by_reqs = [b.budget(n, n * 1000) for n in (0, 50, 100, 200, 400)]
    assert by_reqs == sorted(by_reqs, reverse=True) and by_reqs[0] > by_reqs[-1] + 300
    by_context = [b.budget(64, ctx) for ctx in range(0, 1_100_000, 50_000)]
    assert by_context == sorted(by_context, reverse=True)
    assert by_context[0] > 2 * CHUNK and by_context[-1] < CHUNK // 2
    # KV copies the step makes anyway come off the budget
    assert b.budget(64, 64_000, extra_s=0.01) < b.budget(64, 64_000) - 300


def test_never_below_the_minimum_nor_above_the_cap():
    b = trained(0.05)
    # decodes predicted at ~49.5 ms of the 50 ms SLO: 0.5 ms left is ~20 tokens, under the minimum
    ctx = int((0.0495 - 3e-3 - 30e-6 * 100) / 40e-9)
    assert b.budget(100, ctx) == b.min_tokens == 64
    assert trained(10.0).budget(0, 0) == b.max_tokens == 8 * CHUNK
    # decodes alone over the target: the SLO is out of reach; prefill keeps the fixed chunk's pace
    assert b.budget(100, 2_000_000) == CHUNK


def test_the_fit_tracks_a_change_of_cost():
    """Recent steps weigh more: a worker that turns twice as slow gets half the budget."""
    b = trained(0.05)
    before = b.budget(0, 0)
    rng = random.Random(1)
    for _ in range(300):
        p = rng.randrange(64, 2000)
        b.observe(MixedStep(p, 0, 0), 2 * linear_cost(p, 0, 0))
    assert 0.4 * before <= b.budget(0, 0) <= 0.6 * before


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="step budget"):
        make_step_budget("adaptive", CHUNK, 0.05)
    with pytest.raises(ValueError, match="tpot_s"):
        StepBudget(CHUNK, 0.0)
    with pytest.raises(ValueError, match="margin"):
        StepBudget(CHUNK, 0.05, margin=1.5)
