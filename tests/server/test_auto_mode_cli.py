"""--mode auto's start and its report, without processes: which mode a command line gets,
the initial roles (tetri-plan's pick, or --prefill/--decode), and the roles report's log line,
metric and /workers view."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from tetri.bench.records import Slo
from tetri.cli import build_parser, resolve_mode, role_policy, worker_specs
from tetri.sched.flip import FlipDecision
from tetri.server.metrics import Metrics
from tetri.server.roles_report import RolesReport, phases, reason_kind
from tetri.sim.plan import plan_start


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_auto_is_the_default_for_two_or_more_gpus_only():
    assert resolve_mode(parse("--gpus", "0-1")) == "auto"
    assert resolve_mode(parse("--gpus", "0,3,5")) == "auto"
    assert resolve_mode(parse("--gpus", "0")) == "disagg"  # one GPU: a prefill and a decode process share it
    assert resolve_mode(parse()) == "disagg"  # the CPU default stays 1 prefill + 1 decode
    assert resolve_mode(parse("--gpus", "0-7", "--mode", "colocated")) == "colocated"
    assert resolve_mode(parse("--prefill-gpus", "0", "--decode-gpus", "1")) == "disagg"


SMALL = "--num-requests 30 --max-requests 90 --window-s 2 --max-sims 8"


def test_auto_starts_from_tetri_plans_pick_for_the_declared_slos():
    args = parse("--mode", "auto", "--workers", "3", "--slo-ttft", "1", "--slo-tpot", "0.025", "--plan-flags", SMALL)
    start = plan_start(3, Slo(1.0, 0.025), ["--hardware", "cpu", "--model-preset", "llama-100m", *SMALL.split()])
    assert [s.role for s in worker_specs(args)] == start.roles  # what the server asks (the cpu preset on CPU)
    assert args.auto_start["source"] == "tetri-plan" and args.auto_start["pick"] == start.label
    assert args.auto_start["slo_tpot_s"] == 0.025 and args.auto_start["simulations"] == start.simulations
    gpus = parse("--gpus", "0-2", "--prefill", "1", "--decode", "1")  # auto by default; an explicit split
    assert [(s.role, s.device) for s in worker_specs(gpus)] == [("prefill", "cuda:0"), ("mixed", "cuda:1"),
                                                                ("decode", "cuda:2")]


def test_explicit_split_wins_and_the_rest_start_mixed():
    args = parse("--mode", "auto", "--workers", "4", "--prefill", "1", "--decode", "1")
    assert [s.role for s in worker_specs(args)] == ["prefill", "mixed", "mixed", "decode"]
    with pytest.raises(ValueError):
        worker_specs(parse("--mode", "auto", "--workers", "1"))
    policy = role_policy(parse("--mode", "auto", "--slo-tpot", "0.03", "--role-dwell-s", "0.5"))
    assert policy.tpot_s == 0.03 and policy.dwell_s == 0.5 and not policy.mixed_hands_off


def test_the_report_logs_counts_and_shows_each_decision(caplog):
    metrics = Metrics()
    report = RolesReport("auto", dict(source="tetri-plan"))
    why = "prefill starved for 1.2 s: prefill pressure 0.95 >= 0.8 while decode pressure 0.10 < 0.5; worker 1 mixed -> prefill"
    sched = SimpleNamespace(role_decisions=[(5.0, FlipDecision(1, "mixed", "prefill", why)),
                                            (6.0, FlipDecision(0, "decode", "prefill"))], flip_plan=None)
    with caplog.at_level(logging.INFO, logger="tetri.roles"):
        report.take(sched, metrics)
    report.take(sched, metrics)  # nothing new: nothing reported twice
    assert [r.getMessage() for r in caplog.records][0] == f"role change: worker 1 mixed -> prefill ({why})"
    body = metrics.render().decode()
    assert 'tetri:role_changes_total{from_role="mixed",reason="prefill_starved",to_role="prefill"} 1.0' in body
    assert 'tetri:role_changes_total{from_role="decode",reason="flip",to_role="prefill"} 1.0' in body
    view = report.view()
    assert view["decisions_total"] == 2 and view["recent_decisions"][0]["reason"] == why
    assert view["last_decision"]["reason_kind"] == "flip" and view["start"] == {"source": "tetri-plan"}
    assert reason_kind("both starved for 0.5 s: ...") == "both_starved" and reason_kind("") == "flip"
    assert reason_kind("prefill interference for 1.0 s: ...") == "prefill_interference"
    assert reason_kind("split after 0.5 s of light load ...") == "split"
    assert phases({"mixed"}) == {"prefill", "decode"} and phases({"prefill"}) == {"prefill"}
