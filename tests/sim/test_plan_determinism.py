"""tetri-plan stops after a number of simulated runs, not seconds: the same flags give the
same pick on any machine, however loaded (it used to stop at a wall-clock budget)."""

from __future__ import annotations

from tetri.bench.records import Slo
from tetri.sim import plan

FLAGS = ["--workload", "mixed", "--gpus", "3", "--slo", "ttft=1,tpot=0.05", "--num-requests", "30",
         "--max-requests", "90", "--window-s", "2", "--chunk-sizes", "512",
         "--decode-policies", "greedy", "reserve-dynamic"]
SMALL = ["--num-requests", "30", "--max-requests", "90", "--window-s", "2"]


def search(*extra: str) -> plan.Search:
    parser = plan.build_parser()
    args = parser.parse_args([*FLAGS, *extra])
    return plan.plan_search(args, parser, args.slo[0], args.chunk_sizes, args.decode_policies)


def summary(s: plan.Search):
    best = s.best()
    return (s.sims, best and best.candidate, best and best.max_rate,
            [(e.candidate, e.max_rate, sorted(e.attainment.items())) for e in s.results])


def test_two_searches_give_the_same_pick_and_every_run_alike():
    assert summary(search()) == summary(search())


def test_the_cap_is_a_count_of_simulated_runs():
    capped = search("--max-sims", "5")
    assert capped.sims == 5 and capped.out_of_time
    assert summary(capped) == summary(search("--max-sims", "5"))
    assert "--budget-s" in plan.build_parser().format_help()  # still there, off by default
    assert plan.build_parser().parse_args(FLAGS).budget_s is None


def test_plan_start_roles_follow_the_pick():
    start = plan.plan_start(3, Slo(1.0, 0.05), SMALL)
    again = plan.plan_start(3, Slo(1.0, 0.05), SMALL)
    assert start == again and start.simulations <= plan.DEFAULT_MAX_SIMS
    assert plan.Candidate("tetri", 512, 1, 2).roles(3) == ["prefill", "decode", "decode"]
    assert plan.Candidate("colocated-chunked", 512).roles(3) == ["mixed"] * 3
    label_mode = "tetri" if start.label.startswith("tetri") else "colocated-chunked"
    assert (set(start.roles) <= {"prefill", "decode"}) == (label_mode == "tetri") and len(start.roles) == 3
