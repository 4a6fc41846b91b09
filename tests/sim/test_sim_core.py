"""The simulator: determinism, conservation, KV block invariants, bounds, report shape."""

from __future__ import annotations

import pytest

from tetri.bench.records import Slo
from tetri.bench.report import REPORT_KEYS, SLO_KEYS, build_report
from tetri.bench.workload import Request
from tetri.sim.cluster import Cluster
from tetri.sim.config import MODES, SimConfig
from tetri.sim.simulator import sim_report, simulate

SLO = Slo(ttft_s=1.0, tpot_s=0.05)


def _config(mode: str, **kw) -> SimConfig:
    if mode in ("disagg", "tetri"):
        kw.setdefault("num_prefill", 1)
    return SimConfig(mode=mode, num_gpus=kw.pop("num_gpus", 3), **kw)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_for_a_seed(mode, h200_cost, mixed_requests):
    a = simulate(mixed_requests, _config(mode, seed=7), h200_cost)
    b = simulate(mixed_requests, _config(mode, seed=7), h200_cost)
    assert a.records == b.records
    assert a.duration_s == b.duration_s and a.stats == b.stats


def test_seed_changes_random_choices(h200_cost, make_requests):
    reqs = make_requests(200, 60.0, (20, 400), (20, 400), seed=1)
    runs = [simulate(reqs, _config("tetri", num_gpus=5, seed=s), h200_cost) for s in (1, 2)]
    assert [r.decode_worker for r in runs[0].requests] != [r.decode_worker for r in runs[1].requests]


@pytest.mark.parametrize("mode", MODES)
def test_conservation(mode, h200_cost, mixed_requests, monkeypatch):
    finishes: dict[str, int] = {}
    original = Cluster.finished

    def counting(self, req, worker):
        finishes[req.req_id] = finishes.get(req.req_id, 0) + 1
        original(self, req, worker)

    monkeypatch.setattr(Cluster, "finished", counting)
    result = simulate(mixed_requests, _config(mode), h200_cost)
    assert result.finished
    assert len(finishes) == len(mixed_requests) and set(finishes.values()) == {1}
    for want, rec, req in zip(mixed_requests, result.records, result.requests):
        assert rec.ok and rec.error is None
        assert rec.prompt_tokens == want.prompt_tokens and rec.output_tokens == want.output_tokens
        assert len(rec.itl_s) == want.output_tokens - 1 and min(rec.itl_s, default=1.0) > 0.0
        assert rec.ttft_s > 0.0 and rec.e2e_s >= rec.ttft_s
        assert rec.e2e_s - rec.ttft_s == pytest.approx(sum(rec.itl_s), abs=1e-9)
        assert req.token_times_s[0] >= req.arrival_s and rec.arrival_s == want.arrival_s
    report = sim_report(result, SLO)
    assert report["completed"] == len(mixed_requests) and report["failed"] == 0
    assert report["mean_output_tokens"] * len(mixed_requests) == sum(r.output_tokens for r in mixed_requests)


@pytest.mark.parametrize("mode", MODES)
def test_kv_invariants_hold_under_memory_pressure(mode, h200_cost, make_requests):
    reqs = make_requests(80, 30.0, (50, 600), (50, 400), seed=5)
    result = simulate(reqs, _config(mode, num_blocks=80, check_invariants=True, max_sim_s=300.0), h200_cost)
    assert result.finished and all(r.ok for r in result.records)
    if mode != "tetri":  # greedy admission over-commits a 1280-token pool; it must preempt
        assert result.stats["preemptions"] > 0


def test_invariant_check_catches_a_leak(h200_cost, make_requests):
    from tetri.sim import workers

    original = workers.SimWorker.free_blocks
    calls = {"n": 0}

    def leaky(self, req):
        calls["n"] += 1
        if calls["n"] == 5:
            return  # forget to free once
        original(self, req)

    reqs = make_requests(30, 20.0, (20, 100), (5, 20))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workers.SimWorker, "free_blocks", leaky)
        with pytest.raises(AssertionError):
            simulate(reqs, _config("colocated-chunked", check_invariants=True), h200_cost)


def test_report_keys_match_tetri_bench(h200_cost, mixed_requests):
    result = simulate(mixed_requests, _config("tetri"), h200_cost)
    report = sim_report(result, SLO, {"workload": "crafted"})
    assert set(report) == REPORT_KEYS | SLO_KEYS
    bench = build_report(result.records, result.duration_s, SLO)
    assert {k: v for k, v in report.items() if k != "config"} == {k: v for k, v in bench.items() if k != "config"}
    assert set(sim_report(result)) == REPORT_KEYS
    assert report["config"]["sim"]["mode"] == "tetri" and report["config"]["workload"] == "crafted"


def test_bounded_by_max_sim_time(h200_cost, make_requests):
    reqs = make_requests(100, 50.0, (100, 200), (200, 400))
    result = simulate(reqs, _config("colocated", max_sim_s=0.5), h200_cost)
    assert not result.finished
    failed = [r for r in result.records if not r.ok]
    assert failed and all("not finished" in r.error for r in failed)


def test_requests_that_cannot_fit_fail(h200_cost):
    reqs = [Request(9000, 10, 0.0), Request(100, 10, 0.0), Request(500, 600, 0.0)]
    result = simulate(reqs, _config("tetri", num_blocks=64), h200_cost)  # 1024 tokens per worker
    oks = [r.ok for r in result.records]
    assert oks == [False, True, False]
    assert "max_model_len" in result.records[0].error and "KV cache" in result.records[2].error


def test_closed_loop_requests_arrive_at_zero(h200_cost):
    reqs = [Request(100, 5, None), Request(200, 5, None)]
    result = simulate(reqs, _config("disagg"), h200_cost)
    assert [r.arrival_s for r in result.records] == [0.0, 0.0] and all(r.ok for r in result.records)


def test_config_validation():
    with pytest.raises(ValueError, match="must equal"):
        SimConfig(mode="tetri", num_gpus=8, num_prefill=2, num_decode=2)
    with pytest.raises(ValueError, match="only to"):
        SimConfig(mode="colocated", num_prefill=2)
    with pytest.raises(ValueError):
        SimConfig(mode="nope")
    cfg = SimConfig(mode="tetri", num_gpus=8).resolved()
    assert (cfg.num_prefill, cfg.num_decode, cfg.decode_dispatch, cfg.decode_policy, cfg.predictor) == \
        (2, 6, "tetri", "reserve-dynamic", "oracle")
    assert SimConfig(mode="disagg", num_gpus=4, num_decode=1).resolved().num_prefill == 3
