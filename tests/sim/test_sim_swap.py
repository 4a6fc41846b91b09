"""The simulator's KV swap (issue 19 item 5): the decode side swaps preempted requests out
through the same BlockAllocator bookkeeping and the same swap-or-recompute choice as the real
decode core; swap beats recompute where PCIe is fast and long prompts are preempted, recompute
wins over a slow host link, and auto picks the winner in both."""

import random

from tetri.bench.workload import Request
from tetri.sim import swap_bench
from tetri.sim.config import SimConfig
from tetri.sim.simulator import simulate


def _modes(host_link_gb_s: float) -> dict[str, dict]:
    reqs = swap_bench.requests()
    return {mode: swap_bench.run(reqs, mode, host_link_gb_s) for mode in ("recompute", "swap", "auto")}


def test_swap_beats_recompute_over_a_fast_host_link_and_auto_swaps():
    r = _modes(64.0)
    assert all(x["ok"] for x in r.values())
    assert r["recompute"]["preemptions"] > 0 and r["recompute"]["swaps"] == 0 and r["swap"]["swaps"] > 0
    assert r["swap"]["jct_s"] < r["recompute"]["jct_s"] and r["swap"]["ttft_s"] < r["recompute"]["ttft_s"]
    assert r["swap"]["goodput"] > r["recompute"]["goodput"]
    assert r["auto"] == r["swap"]


def test_recompute_beats_swap_over_a_slow_host_link_and_auto_recomputes():
    r = _modes(4.0)
    assert r["swap"]["swaps"] > 0 and r["swap"]["jct_s"] > r["recompute"]["jct_s"]
    assert r["swap"]["goodput"] < r["recompute"]["goodput"]
    assert r["auto"] == r["recompute"]


def test_swapped_requests_keep_the_block_invariants_every_step(h200_cost):
    rng = random.Random(4)
    reqs = [Request(rng.randint(200, 400), rng.randint(50, 150), i * 0.02) for i in range(30)]
    cfg = SimConfig(mode="tetri", num_gpus=2, num_prefill=1, decode_policy="mlfq", max_num_seqs=4, num_blocks=120,
                    swap_space=1.0, preemption_mode="swap", check_invariants=True)
    result = simulate(reqs, cfg, h200_cost)
    assert result.finished and all(r.ok and r.output_tokens == q.output_tokens for r, q in zip(result.records, reqs))
    assert result.stats["swaps"] > 0 and result.stats["swap_recomputes"] == 0
