"""The SLO step budget in the simulator: mode auto's mixed steps (and colocated-chunked's, opted
in) size their prompt budget from the declared TPOT through tetri.sched.step_budget."""

from __future__ import annotations

import statistics

from tetri.sim.cli import build_parser, sim_config
from tetri.sim.config import SimConfig
from tetri.sim.simulator import simulate


def _p99(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def _figures(result):
    ttft = statistics.mean(r.ttft_s for r in result.records)
    tpot = _p99([r.tpot_s for r in result.records if r.tpot_s is not None])
    return ttft, tpot


def test_auto_sizes_mixed_steps_to_the_declared_tpot(h200_cost, make_requests):
    # 2 all-mixed H200s, long prompts arriving fast: 512-token chunks queue prompts up
    reqs = make_requests(120, 60.0, (500, 2500), (20, 200), seed=5)
    chunked = simulate(reqs, SimConfig(mode="colocated-chunked", num_gpus=2), h200_cost)
    # roles held (role_dwell_s: no flips): the budget, not the roles, is what differs
    loose = simulate(reqs, SimConfig(mode="auto", num_gpus=2, step_tpot_s=0.05, role_dwell_s=1e9), h200_cost)
    tight = simulate(reqs, SimConfig(mode="auto", num_gpus=2, step_tpot_s=0.025, role_dwell_s=1e9), h200_cost)
    assert loose.stats["flips"] == 0 and tight.stats["flips"] == 0
    (c_ttft, c_tpot), (l_ttft, l_tpot), (t_ttft, t_tpot) = map(_figures, (chunked, loose, tight))
    assert all(r.ok for r in loose.records + tight.records)
    assert l_ttft < 0.7 * c_ttft  # a 50 ms TPOT leaves room for steps of several chunks
    assert c_tpot < l_tpot <= 0.05
    assert l_ttft < t_ttft and t_tpot < l_tpot <= 0.05  # a 25 ms TPOT takes smaller steps ...
    assert t_tpot <= 0.025  # ... and holds it


def test_fixed_unless_auto_or_opted_in(h200_cost, make_requests):
    assert SimConfig(mode="auto").resolved().step_budget == "slo"
    assert SimConfig(mode="colocated-chunked", step_tpot_s=0.05).resolved().step_budget == "fixed"
    reqs = make_requests(120, 40.0, (500, 2500), (20, 100), seed=7)
    chunked = simulate(reqs, SimConfig(mode="colocated-chunked", num_gpus=2, step_tpot_s=0.05), h200_cost)
    base = simulate(reqs, SimConfig(mode="colocated-chunked", num_gpus=2), h200_cost)
    opted = simulate(reqs, SimConfig(mode="colocated-chunked", num_gpus=2, step_tpot_s=0.05, step_budget="slo"),
                     h200_cost)
    assert [r.ttft_s for r in chunked.records] == [r.ttft_s for r in base.records]
    assert _figures(opted)[0] < _figures(base)[0]
    # auto without a declared TPOT: the fixed chunk, as colocated-chunked
    auto = simulate(reqs, SimConfig(mode="auto", num_gpus=2, role_dwell_s=1e9), h200_cost)
    assert [r.ttft_s for r in auto.records] == [r.ttft_s for r in base.records]


def test_cli_declares_the_slo_tpot_to_the_step_budget():
    common = ["--workload", "mixed", "--rate", "10"]
    auto = sim_config(build_parser().parse_args([*common, "--mode", "auto", "--slo", "ttft=1,tpot=0.025"]))
    assert (auto.step_budget, auto.step_tpot_s) == (None, 0.025) and auto.resolved().step_budget == "slo"
    fixed = sim_config(build_parser().parse_args([*common, "--mode", "auto", "--slo", "ttft=1,tpot=0.025",
                                                  "--step-budget", "fixed"]))
    assert fixed.resolved().step_budget == "fixed"
    opted = sim_config(build_parser().parse_args([*common, "--mode", "colocated-chunked", "--slo",
                                                  "ttft=1,tpot=0.05", "--step-budget", "slo"]))
    assert opted.resolved().step_budget == "slo" and opted.step_tpot_s == 0.05
    assert sim_config(build_parser().parse_args([*common, "--mode", "auto"])).step_tpot_s is None
