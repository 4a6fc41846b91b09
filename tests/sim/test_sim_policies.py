"""The simulator drives the real tetri.sched objects, and the modes differ the expected way."""

from __future__ import annotations

import statistics

import pytest

from tetri.bench.workload import Request
from tetri.sched import chunking, decode_policy, dispatch, flip, predictor
from tetri.sim.config import SimConfig
from tetri.sim.simulator import simulate


def _count_calls(monkeypatch, cls, name: str) -> dict[str, int]:
    calls = {"n": 0}
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def test_tetri_mode_uses_the_real_policy_objects(monkeypatch, h200_cost, make_requests):
    counters = {
        "prefill dispatch": _count_calls(monkeypatch, dispatch.LeastLoadedPrefill, "pick"),
        "decode dispatch": _count_calls(monkeypatch, dispatch.TetriDecode, "pick"),
        "chunk packer": _count_calls(monkeypatch, chunking.ChunkPacker, "next_chunk"),
        "admission": _count_calls(monkeypatch, decode_policy.ReserveDynamicPolicy, "admit"),
        "batching": _count_calls(monkeypatch, decode_policy.GreedyDecodePolicy, "schedule"),
        "predictor": _count_calls(monkeypatch, predictor.OraclePredictor, "predict"),
    }
    reqs = make_requests(60, 20.0, (20, 900), (2, 200))
    result = simulate(reqs, SimConfig(mode="tetri", num_gpus=4, num_prefill=2), h200_cost)
    assert all(r.ok for r in result.records)
    assert {k: c["n"] > 0 for k, c in counters.items()} == {k: True for k in counters}
    assert counters["prefill dispatch"]["n"] == 60 and counters["decode dispatch"]["n"] == 60
    assert counters["predictor"]["n"] == 60


def test_disagg_and_colocated_use_their_policies(monkeypatch, h200_cost, make_requests):
    rr = _count_calls(monkeypatch, dispatch._RoundRobin, "pick")
    tetri = _count_calls(monkeypatch, dispatch.TetriDecode, "pick")
    reqs = make_requests(40, 20.0, (20, 500), (2, 100))
    simulate(reqs, SimConfig(mode="disagg", num_gpus=3, num_prefill=1), h200_cost)
    assert rr["n"] == 40 and tetri["n"] == 0
    packer = _count_calls(monkeypatch, chunking.ChunkPacker, "next_chunk")
    simulate(reqs, SimConfig(mode="colocated-chunked", num_gpus=2), h200_cost)
    assert packer["n"] > 0


def test_flip_uses_the_real_flip_policy_and_plan(monkeypatch, h200_cost):
    decide = _count_calls(monkeypatch, flip.FlipPolicy, "decide")
    flipped = _count_calls(monkeypatch, flip.FlipPlan, "on_flipped")
    # 3 prefill workers with almost nothing to prefill; 1 decode worker with a tiny pool.
    reqs = [Request(50, 300, i * 0.02) for i in range(120)]
    cfg = SimConfig(mode="tetri", num_gpus=4, num_prefill=3, num_blocks=64, flip=True, flip_window_s=0.5,
                    check_invariants=True)
    result = simulate(reqs, cfg, h200_cost)
    assert decide["n"] > 0 and flipped["n"] >= 1 and result.stats["flips"] >= 1
    assert all(r.ok for r in result.records)
    no_flip = simulate(reqs, SimConfig(mode="tetri", num_gpus=4, num_prefill=3, num_blocks=64), h200_cost)
    assert statistics.mean(r.e2e_s for r in result.records) < statistics.mean(r.e2e_s for r in no_flip.records)


def test_predictor_noise_moves_buckets(h200_cost, make_requests):
    reqs = make_requests(200, 50.0, (20, 200), (1, 900))
    exact = simulate(reqs, SimConfig(mode="tetri", num_gpus=3, num_prefill=1), h200_cost)
    noisy = simulate(reqs, SimConfig(mode="tetri", num_gpus=3, num_prefill=1, predictor_accuracy=0.75), h200_cost)
    assert exact.stats["mispredictions"] == 0 and exact.stats["predictions"] == 200
    assert 20 <= noisy.stats["mispredictions"] <= 80
    lows = [r.info.predicted_low_tokens for r in noisy.requests]
    assert all(low % 200 == 0 for low in lows)
    none = simulate(reqs, SimConfig(mode="tetri", num_gpus=3, num_prefill=1, predictor="none"), h200_cost)
    assert none.stats["predictions"] == 0 and all(r.info.predicted_low_tokens is None for r in none.requests)


def _mean(result, attr: str) -> float:
    return statistics.mean(getattr(r, attr) for r in result.records)


def test_lphd_disaggregation_cuts_ttft(h200_cost, make_requests):
    """Light prompts, heavy decodes at a load that fills the colocated workers' batches:
    colocated prompts queue behind running decodes (vLLM's max_num_seqs), disaggregated
    prompts do not (TetriInfer: LPHD TTFT -97%)."""
    reqs = make_requests(250, 25.0, (50, 300), (300, 600), seed=2)
    common = dict(num_gpus=2, max_num_seqs=16)
    ttft = {m: _mean(simulate(reqs, SimConfig(mode=m, **({"num_prefill": 1} if m in ("tetri", "disagg") else {}),
                                              **common), h200_cost), "ttft_s")
            for m in ("colocated", "disagg", "tetri")}
    assert ttft["tetri"] < 0.1 * ttft["colocated"]
    assert ttft["disagg"] < 0.1 * ttft["colocated"]


def test_chunked_prefill_protects_decodes_from_long_prompts(h200_cost, make_requests):
    """Heavy prompts stall every decode in vLLM-v0.2 style colocation; chunking bounds it."""
    reqs = make_requests(150, 8.0, (3000, 7000), (50, 150), seed=4)
    p99_itl = {}
    for mode in ("colocated", "colocated-chunked"):
        result = simulate(reqs, SimConfig(mode=mode, num_gpus=2), h200_cost)
        gaps = sorted(g for r in result.records for g in r.itl_s)
        p99_itl[mode] = gaps[int(0.99 * (len(gaps) - 1))]
    assert p99_itl["colocated-chunked"] < 0.5 * p99_itl["colocated"]


@pytest.mark.parametrize("policy", ["greedy", "reserve-static", "reserve-dynamic", "mlfq"])
def test_every_decode_policy_completes(policy, h200_cost, make_requests):
    reqs = make_requests(60, 30.0, (20, 400), (20, 300), seed=6)
    result = simulate(reqs, SimConfig(mode="tetri", num_gpus=3, num_prefill=1, decode_policy=policy, num_blocks=60,
                                      check_invariants=True, max_sim_s=300.0), h200_cost)
    assert result.finished and all(r.ok for r in result.records)


@pytest.mark.parametrize("prefill_policy", ["sjf", "ljf"])
def test_prefill_policies_reorder(prefill_policy, h200_cost):
    # The first prompt's two chunks fill the front's `chunks_ahead` (2) plans for the prefill
    # worker, so the other three queue up together in the front's packer.
    reqs = [Request(1024, 2, 0.0), Request(2000, 2, 0.001), Request(100, 2, 0.001), Request(1000, 2, 0.001)]
    result = simulate(reqs, SimConfig(mode="tetri", num_gpus=2, prefill_policy=prefill_policy), h200_cost)
    order = sorted(range(1, 4), key=lambda i: result.records[i].arrival_s + result.records[i].ttft_s)
    assert order == ([2, 3, 1] if prefill_policy == "sjf" else [1, 3, 2])
