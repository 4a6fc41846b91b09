"""The prefix cache's host tier in the simulator (`--kv-offloading-size`): the same
`BlockAllocator` tier as tetri-serve, uploads charged at the PCIe rate, the uploaded tokens'
prefill skipped, and the pooled-LRU bound reported at the larger capacity."""

from __future__ import annotations

import random

import pytest

from tetri.bench.workload import Request
from tetri.sim.cluster import Cluster
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import GB, HARDWARE_PRESETS, MODEL_PRESETS, CostModel
from tetri.sim.simulator import simulate
from tetri.sim.workers import EventLoop

COST = CostModel(MODEL_PRESETS["llama3.1-8b"], HARDWARE_PRESETS["h200"])
BLOCK_GIB = COST.model.kv_bytes_per_token * 16 / 2**30  # 2 MiB: one 16-token block of llama3-8b


def _reqs() -> list[Request]:
    """A 4096-token prompt, three 4096-token others that push it out of a 600-block pool, then it again."""
    a = tuple(range(8))
    return [Request(4097, 2, 0.0, a)] + [Request(4097, 2, 5.0 * i, tuple(range(100 * i, 100 * i + 8)))
                                         for i in (1, 2, 3)] + [Request(4097, 2, 20.0, a)]


def _run(host_gib: float):
    cfg = SimConfig(mode="tetri", num_gpus=2, num_prefill=1, prefix_caching=True, num_blocks=600,
                    kv_offloading_size=host_gib, check_invariants=True)
    return simulate(_reqs(), cfg, COST)


def test_the_host_tier_turns_the_repeat_into_an_upload_at_the_pcie_rate():
    gpu, host = _run(0.0), _run(600 * BLOCK_GIB)
    assert all(r.ok for r in gpu.records + host.records)
    assert gpu.stats["prefix_cache_hits"] == 0 and gpu.stats["prefix_cache_evictions"] > 0
    assert host.stats["host_blocks_per_worker"] == 600
    assert host.stats["prefix_cache_hits"] == host.stats["prefix_cache_host_hits"] == 256 * 16
    assert host.stats["kv_uploaded_blocks"] == 256 and host.stats["kv_offloaded_blocks"] >= 256
    # the repeat skips 4096 of its 4097 prefill tokens but pays their upload over PCIe
    ttft = {name: res.records[4].ttft_s for name, res in (("gpu", gpu), ("host", host))}
    upload_s = COST.host_copy_s(256 * 16)
    assert upload_s == pytest.approx(4096 * 131072 / (64 * GB * 0.8) + COST.hw.link_latency_s)
    assert upload_s < ttft["host"] < ttft["gpu"] - upload_s
    # the bound with the host blocks pooled in sees the repeat too
    assert host.stats["prefix_cache_pooled_lru_with_host_hit_rate"] > host.stats["prefix_cache_pooled_lru_hit_rate"] == 0


def test_no_host_tier_without_caching_or_on_decode_workers():
    cfg = SimConfig(mode="tetri", num_gpus=2, num_prefill=1, prefix_caching=False, num_blocks=600,
                    kv_offloading_size=1.0)
    res = simulate(_reqs()[:1], cfg, COST)
    assert "prefix_cache_host_hits" not in res.stats
    c = Cluster(SimConfig(mode="tetri", num_gpus=2, num_prefill=1, prefix_caching=True, num_blocks=600,
                          kv_offloading_size=1.0).resolved(), COST, EventLoop(), random.Random(0))
    assert [w.blocks.host is not None for w in c.workers] == [True, False]
