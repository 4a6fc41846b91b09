"""How a CUDA worker sizes its KV pool: from its own share of the device's total memory, minus
what it measured itself, never from what other processes on the device hold.

    budget   = total * gpu_memory_utilization * memory_share      (two workers on one GPU: 0.5 each)
    kv_bytes = budget - weights - activations - graph pool - sampler workspace
    blocks   = kv_bytes // block_bytes                            (too few: a MemoryError naming the numbers)

`measure_cuda_usage` takes the numbers from `torch.cuda.max_memory_allocated` (after
`reset_peak_memory_stats`) around warm-up forwards over a small temporary pool: a decode
step at `max_num_seqs` rows (whose activations the captured graphs' pool holds a second
time) and the largest mixed step, one chunk of `chunk_size` tokens beside those decodes (with
the SLO step budget, its cap: `EngineSchedConfig.max_step_prompt_tokens`).
The warm-up also compiles the Triton kernels. What stays outside torch's allocator (the CUDA
context, cuBLAS workspaces) is what `1 - gpu_memory_utilization` leaves free.
`plan_pool` is the pure arithmetic, tested with injected numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SAMPLER_OWN_BUFFERS = 6.5
"""The most logits-sized fp32 buffers the sampler's own tensors hold at once beside the logits
(a copy of the logits, the drawing rows' copy, sorted probabilities, their int64 order and
running sum, with top-p): measured on CPU by tests/engine/test_sampler.py (5.3 when every
row draws, 6.0 with one greedy row beside them)."""
SAMPLER_WORKSPACE = 9
"""Logits-sized fp32 buffers budgeted for the sampler: its own (above) plus about 2.5 for the
key and index copies a CUDA segmented sort makes inside `torch.sort` (estimated, not measured:
no GPU was available)."""


@dataclass(frozen=True)
class CudaUsage:
    weights_bytes: int  # everything this process held before the warm-up (weights, rope tables)
    activation_bytes: int  # peak beyond that and the temporary pool over the warm-up steps
    decode_activation_bytes: int  # the same for the decode step alone (what a graph pool holds)


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: float
    reserved_bytes: float  # weights + activations + graph pool + sampler workspace
    kv_bytes: float
    num_blocks: int


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_pool(total_bytes: int, utilization: float, share: float, usage: CudaUsage, graph_bytes: int,
              sampler_bytes: int, block_bytes: int, min_blocks: int) -> MemoryPlan:
    """The pool's size in blocks; raises MemoryError when fewer than `min_blocks` fit."""
    budget = total_bytes * utilization * share
    reserved = usage.weights_bytes + usage.activation_bytes + graph_bytes + sampler_bytes
    kv = budget - reserved
    blocks = int(kv // block_bytes) if kv > 0 else 0
    if blocks < min_blocks:
        raise MemoryError(
            f"the KV pool does not fit: this worker's budget is {_gib(budget)} ({share:.2f} of {_gib(total_bytes)}"
            f" x gpu_memory_utilization {utilization}); weights {_gib(usage.weights_bytes)}, warm-up activations"
            f" {_gib(usage.activation_bytes)}, CUDA graphs {_gib(graph_bytes)} and sampler {_gib(sampler_bytes)}"
            f" leave {_gib(max(kv, 0))}, {blocks} blocks of {block_bytes} bytes, below the {min_blocks} needed;"
            " raise --gpu-memory-utilization, lower --chunk-size or --max-num-seqs, use --enforce-eager,"
            " or give the worker a GPU of its own")
    return MemoryPlan(budget, reserved, kv, blocks)


def bind_device(device: str) -> None:
    """Make `device` this process's current CUDA device (before anything touches CUDA), so
    that default streams, allocations and kernels land there."""
    if device.startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.set_device(dev.index if dev.index is not None else 0)


def measure_cuda_usage(loaded, layout1, device: str, chunk_size: int, max_num_seqs: int,
                       attention: str = "auto") -> CudaUsage:
    """Warm up over a temporary pool and read this process's own peaks (see the module doc)."""
    from tetri.workers.kv_pool import KVPool
    from tetri.workers.model_runner import ModelRunner, Segment

    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    weights = torch.cuda.memory_allocated(dev)
    bs = layout1.block_size
    chunk_blocks = -(-chunk_size // bs)
    pool = KVPool.allocate(replace(layout1, num_blocks=chunk_blocks + max_num_seqs), device)
    runner = ModelRunner(loaded, pool, device, attention)
    decodes = [Segment([0], 0, [chunk_blocks + i], True) for i in range(max_num_seqs)]
    chunk = Segment([0] * chunk_size, 0, list(range(chunk_blocks)), True)
    peaks = []
    for segments in (decodes, decodes + [chunk]):
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        logits = runner.run(segments)
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        del logits
    del runner, pool
    torch.cuda.empty_cache()
    return CudaUsage(weights, max(peaks), peaks[0])
