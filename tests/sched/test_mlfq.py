"""FastServe skip-join MLFQ: skip-join placement, demotion, starvation promotion, preemption."""

from hypothesis import given
from hypothesis import strategies as st

from tetri.sched.decode_policy import DecodeReqView
from tetri.sched.mlfq import MLFQDecodePolicy, skip_join_level


def view(req_id, prompt, generated=0, held=None, block_size=16):
    ctx = prompt + generated
    held = -(-ctx // block_size) if held is None else held
    return DecodeReqView(req_id, ctx, generated, 4096, None, 0.0, held)


@given(st.integers(1, 100_000), st.integers(1, 512), st.integers(1, 8), st.integers(1, 12))
def test_skip_join_rule(prompt, tokens_per_step, base, levels):
    level = skip_join_level(prompt, tokens_per_step, base, levels)
    cost = -(-prompt // tokens_per_step)
    covering = [i for i in range(levels) if base * 2**i >= cost]
    assert level == (covering[0] if covering else levels - 1)


def test_new_job_joins_highest_level_covering_first_iteration():
    p = MLFQDecodePolicy(num_levels=6, base_quantum_steps=1, prompt_tokens_per_step=64)
    reqs = [view("short", 50), view("mid", 1024), view("long", 4000), view("huge", 100_000)]
    p.admit(reqs, [], 10_000, 16, 0.0)
    # costs: 1, 16, 63, 1563 steps -> levels 0, 4, 6 capped to 5, 5
    assert [p.level_of(r.req_id) for r in reqs] == [0, 4, 5, 5]
    # generated tokens do not count as prompt when a preempted job is first seen
    assert skip_join_level(view("g", 64, generated=500).context_tokens - 500, 64, 1, 6) == 0


def test_demotion_on_quantum_exhaustion():
    p = MLFQDecodePolicy(num_levels=4, base_quantum_steps=2, starvation_s=100.0)
    a = view("a", 10)
    p.schedule([a], 8, 100, 16, 0.0)
    assert p.level_of("a") == 0
    levels = []
    for step in range(1, 16):
        p.on_step(["a"], float(step))
        levels.append(p.level_of("a"))
    # quanta 2, 4, 8 steps: demoted after 2, 2+4=6, 6+8=14 steps; level 3 is the floor
    assert levels == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3]


def test_schedule_runs_highest_priority_and_preempts_when_short():
    p = MLFQDecodePolicy(num_levels=6, base_quantum_steps=1, prompt_tokens_per_step=64, starvation_s=100.0)
    long_job, short_job = view("long", 2048), view("short", 32)
    run, preempt = p.schedule([long_job, short_job], 1, 10, 16, 0.0)
    assert run == ["short"] and preempt == []  # "long" pauses, keeps its KV
    # both at a block boundary need a new block each; 1 free block: the paused job is
    # preempted first, which frees enough for the one that runs
    p2 = MLFQDecodePolicy(num_levels=6, prompt_tokens_per_step=64, starvation_s=100.0)
    run, preempt = p2.schedule([view("long", 2048), view("short", 32), view("mid", 256)], 2, 0, 16, 0.0)
    assert run == ["short", "mid"] and preempt == ["long"]
    # nobody to pause: the lowest-priority runner is preempted
    p3 = MLFQDecodePolicy(num_levels=6, prompt_tokens_per_step=64, starvation_s=100.0)
    run, preempt = p3.schedule([view("long", 2048), view("short", 32)], 4, 1, 16, 0.0)
    assert run == ["short"] and preempt == ["long"]


def test_starvation_promotes_to_top():
    p = MLFQDecodePolicy(num_levels=6, prompt_tokens_per_step=64, starvation_s=0.3)
    jobs = [view("long", 2048), view("short", 32)]
    p.schedule(jobs, 1, 100, 16, 0.0)
    assert p.level_of("long") == 5
    for k in range(1, 3):
        run, _ = p.schedule(jobs, 1, 100, 16, 0.1 * k)
        p.on_step(run, 0.1 * k)
    assert p.level_of("long") == 5
    run, _ = p.schedule(jobs, 1, 100, 16, 0.35)  # "long" has waited 0.35 s >= 0.3 s
    assert p.level_of("long") == 0 and p.entry("long").service_steps == 0
    assert run == ["long"]  # "short" was demoted below level 0 by its steps


def test_admit_priority_order_and_forget():
    p = MLFQDecodePolicy(num_levels=6, prompt_tokens_per_step=64)
    waiting = [view("long", 2048, held=0), view("short", 32, held=0)]
    assert p.admit(waiting, [], 200, 16, 0.0) == ["short", "long"]
    assert p.admit(waiting, [], 3, 16, 0.0) == ["short"]  # long (129 blocks) does not fit; no overtaking past it
    p.forget("short")
    assert p.level_of("short") is None and p.level_of("long") == 5
