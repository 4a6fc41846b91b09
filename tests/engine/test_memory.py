"""KV pool sizing on CUDA, with injected numbers (the arithmetic is pure; tests/engine/
test_cuda.py checks it with real CUDA numbers where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from tetri.config import CacheConfig
from tetri.workers import executor
from tetri.workers.attention import stage_budget_bytes
from tetri.workers.kv_pool import PoolLayout
from tetri.workers.memory import CudaUsage, plan_pool

GiB = 2**30
TOTAL = 80 * GiB
LAYOUT1 = PoolLayout(1, 32, 16, 8, 128, "bfloat16")  # a Llama-3-8B block: 2 MiB
WEIGHTS = CudaUsage(16 * GiB, 2 * GiB, 1 * GiB)


def _blocks(**kw) -> int:
    args = dict(total_bytes=TOTAL, utilization=0.9, share=1.0, usage=WEIGHTS, graph_bytes=0, sampler_bytes=0,
                block_bytes=LAYOUT1.block_bytes, min_blocks=1) | kw
    return plan_pool(**args).num_blocks


def test_budget_is_the_share_of_total_minus_what_this_process_measured():
    assert LAYOUT1.block_bytes == 2 * 2**20
    expected = int((TOTAL * 0.9 - 18 * GiB) // LAYOUT1.block_bytes)
    assert _blocks() == expected
    # Two processes sharing one GPU each get half the budget, minus only their own usage.
    half = _blocks(share=0.5)
    assert half == int((TOTAL * 0.45 - 18 * GiB) // LAYOUT1.block_bytes)


def test_a_measured_peak_and_the_graph_pool_reduce_the_pool():
    base = _blocks()
    assert _blocks(usage=CudaUsage(16 * GiB, 6 * GiB, 1 * GiB)) == base - 4 * GiB // LAYOUT1.block_bytes
    assert _blocks(graph_bytes=GiB, sampler_bytes=GiB) == base - 2 * GiB // LAYOUT1.block_bytes


def test_too_little_memory_is_a_clear_error():
    with pytest.raises(MemoryError, match=r"KV pool does not fit.*weights 16.00 GiB.*--gpu-memory-utilization"):
        _blocks(total_bytes=20 * GiB)
    with pytest.raises(MemoryError, match="below the 100 needed"):
        _blocks(total_bytes=int(18.1 * GiB), utilization=1.0, min_blocks=100)  # 51 blocks fit


def test_pool_blocks_reads_the_total_not_what_other_processes_left_free(monkeypatch):
    """Another process on the GPU already holds 70 GiB: this worker's pool is sized from its
    own share of the total, not from the 10 GiB left free (which gave it ~nothing before)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GiB, TOTAL))
    blocks = executor.pool_blocks(CacheConfig(), LAYOUT1, "cuda:0", 0.5, WEIGHTS)
    assert blocks == _blocks(share=0.5)
    assert executor.pool_blocks(CacheConfig(num_blocks=7), LAYOUT1, "cuda:0", 0.5, WEIGHTS) == 7


def test_the_decode_stage_is_bounded_off_the_cpu():
    assert stage_budget_bytes(torch.empty(10, dtype=torch.float32)) == 40
    assert stage_budget_bytes(torch.empty(10, device="meta")) == 0  # any non-CPU pool: no stage beside it
