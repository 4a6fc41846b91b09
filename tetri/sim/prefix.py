"""Prefix caching in the simulator, from the Mooncake trace's `hash_ids`.

The trace marks each request's prompt with one id per 512-token block, chained like the real
cache's hashes (equal ids: the same prefix up to the end of that block). The simulated prefill
worker caches at its own block size (16) with the real `BlockAllocator`, so each trace block
id `h` stands for the sub-block keys `(h, 0) .. (h, 512/16 - 1)`; the front's `PrefixIndex`
and cache-aware dispatch work on the trace ids themselves (512 tokens each), as the real front
works on its own block hashes.

    ideal hit rate: one infinite cache seen by every request in arrival order (an upper
    bound: the first sight of each block is always a miss); with `capacity_blocks`, one LRU
    cache of that many blocks shared by every request (the bound at the cluster's capacity).
"""

from __future__ import annotations

from collections import OrderedDict

from tetri.sched.prefix_hash import cacheable_blocks

TRACE_BLOCK_TOKENS = 512
"""Tokens per Mooncake `hash_ids` entry."""


def sub_block_keys(hash_ids: tuple[int, ...], prompt_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Allocator keys of the prompt's cacheable full blocks (at least one token computed)."""
    per = TRACE_BLOCK_TOKENS // block_size
    n = min(cacheable_blocks(prompt_tokens, block_size), len(hash_ids) * per)
    return [(hash_ids[i // per], i % per) for i in range(n)]


def index_ids(hash_ids: tuple[int, ...], prompt_tokens: int) -> tuple[int, ...]:
    """The trace ids whose 512 tokens all lie in the prompt's cacheable part (what the front
    indexes and dispatch matches)."""
    return tuple(hash_ids[:max(0, prompt_tokens - 1) // TRACE_BLOCK_TOKENS])


def ideal_hit_rate(requests, block_size: int, capacity_blocks: int | None = None) -> float:
    """Prompt tokens one shared cache (infinite, or LRU of `capacity_blocks`) would hit /
    prompt tokens, in arrival order."""
    seen: OrderedDict[tuple[int, int], None] = OrderedDict()
    hits = total = 0
    for r in sorted(requests, key=lambda r: r.arrival_s or 0.0):
        keys = sub_block_keys(tuple(getattr(r, "hash_ids", ()) or ()), r.prompt_tokens, block_size)
        total += r.prompt_tokens
        for k in keys:
            if k not in seen:
                break
            hits += block_size
        for k in keys:
            seen[k] = None
            seen.move_to_end(k)
        while capacity_blocks is not None and len(seen) > capacity_blocks:
            seen.popitem(last=False)
    return hits / total if total else 0.0
