"""Prefix caching in the simulator (hits from the Mooncake trace's hash_ids) and cache-aware
level-1 dispatch: the real allocator and dispatcher, invariants checked every step."""

from __future__ import annotations

import random

import pytest

from tetri.bench.workload import Request, default_traces_dir, load_mooncake_jsonl
from tetri.sched.dispatch import CacheAwarePrefill, make_prefill_dispatch
from tetri.sched.load import ReqInfo, WorkerLoad
from tetri.sched.prefix_index import PrefixIndex
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import HARDWARE_PRESETS, MODEL_PRESETS, CostModel
from tetri.sim.prefix import ideal_hit_rate, index_ids, sub_block_keys
from tetri.sim.simulator import simulate


def _info(prompt: int, hashes: tuple) -> ReqInfo:
    return ReqInfo("r", prompt, 16, prefix_hashes=hashes, prefix_block_tokens=512)


def test_cache_aware_dispatch_trades_matched_tokens_against_queued_work():
    index = PrefixIndex()
    d = make_prefill_dispatch("cache-aware", random.Random(0), index)
    assert isinstance(d, CacheAwarePrefill)
    index.add(1, ["a", "b", "c"])
    loads = [WorkerLoad(0, "prefill"), WorkerLoad(1, "prefill", queued_prefill_tokens=1000)]
    # 1536 of 2048 tokens cached on 1 outweigh its 1000 queued tokens ...
    assert d.pick(loads, _info(2048, ("a", "b", "c"))) == 1
    # ... but not 2000 queued tokens (queued + uncached: 2512 there against 2048 on worker 0)
    loads[1] = WorkerLoad(1, "prefill", queued_prefill_tokens=2000)
    assert d.pick(loads, _info(2048, ("a", "b", "c"))) == 0
    # no match anywhere (or no hashes): least-loaded
    loads = [WorkerLoad(0, "prefill", queued_prefill_tokens=10), WorkerLoad(1, "prefill", queued_prefill_tokens=5)]
    assert d.pick(loads, _info(2048, ("x",))) == 1 and d.pick(loads, _info(2048, ())) == 1
    index.evicted(1, ["a"])  # an eviction report ends the match
    loads = [WorkerLoad(0, "prefill"), WorkerLoad(1, "prefill", queued_prefill_tokens=100)]
    assert d.pick(loads, _info(2048, ("a", "b", "c"))) == 0


def test_trace_ids_expand_to_cacheable_sub_blocks_and_the_ideal_counts_repeats():
    keys = sub_block_keys((7, 8), 600, 16)
    assert len(keys) == 599 // 16 and keys[0] == (7, 0) and keys[32] == (8, 0)
    assert index_ids((7, 8), 600) == (7,) and index_ids((7, 8), 1025) == (7, 8)
    reqs = [Request(1024, 1, 0.0, (1, 2)), Request(1024, 1, 1.0, (1, 3)), Request(1024, 1, 2.0, (1, 2))]
    # second: block 1's 512 tokens; third: block 1 + block 2 but one token is always computed
    assert ideal_hit_rate(reqs, 16) == pytest.approx((512 + 1008) / 3072)


@pytest.fixture(scope="module")
def mooncake():
    base = default_traces_dir()
    if base is None or not (base / "mooncake_fast25").is_dir():
        pytest.skip("shared traces folder not found (CI puts shared/ beside the checkout)")
    path = base / "mooncake_fast25" / "synthetic_trace.jsonl"
    reqs = load_mooncake_jsonl(path)
    # the first 250 requests, at most 16k tokens (a small long-context cluster)
    return [r for r in reqs if r.prompt_tokens + r.output_tokens <= 16000][:250]


def _run(reqs, dispatch: str, caching: bool = True, num_blocks: int = 4000, check: bool = False):
    cost = CostModel(MODEL_PRESETS["llama3.1-8b"], HARDWARE_PRESETS["h200"])
    cfg = SimConfig(mode="tetri", num_gpus=4, num_prefill=3, prefill_dispatch=dispatch, prefix_caching=caching,
                    num_blocks=num_blocks, check_invariants=check)
    return simulate(reqs, cfg, cost)


def test_shared_and_evicted_blocks_keep_every_invariant(mooncake):
    res = _run(mooncake[:60], "cache-aware", num_blocks=1500, check=True)  # invariants after every step
    assert all(r.ok for r in res.records)
    assert res.stats["prefix_cache_hits"] > 0 and res.stats["prefix_cache_evictions"] > 0


def test_cache_aware_dispatch_hits_more_than_least_loaded_on_the_mooncake_trace(mooncake):
    aware, least = _run(mooncake, "cache-aware"), _run(mooncake, "least-loaded")
    off = _run(mooncake, "least-loaded", caching=False)
    for res in (aware, least, off):
        assert all(r.ok for r in res.records)
    ideal = aware.stats["prefix_cache_ideal_hit_rate"]
    assert least.stats["prefix_cache_hit_rate"] < aware.stats["prefix_cache_hit_rate"] <= ideal
    assert aware.stats["prefix_cache_evictions"] > 0  # a small pool: the index is corrected by reports
    assert "prefix_cache_hits" not in off.stats

    def mean_ttft(res):
        return sum(r.ttft_s for r in res.records) / len(res.records)

    assert mean_ttft(aware) < mean_ttft(least) < mean_ttft(off)


def test_the_pooled_lru_bound_is_below_the_infinite_cache():
    reqs = [Request(1024, 1, float(i), (i % 3, 100 + i % 3)) for i in range(9)]
    assert ideal_hit_rate(reqs, 16, capacity_blocks=63) < ideal_hit_rate(reqs, 16)
