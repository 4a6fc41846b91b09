"""Snapshots of worker load that policies decide from (pure data, no I/O).

`WorkerLoad` is what one row of the shared-memory load board (`tetri.control.load_board`)
decodes to; the front scheduler and the simulator both hand lists of these to the policies.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLE_CODES = {"prefill": 1, "decode": 2, "mixed": 3}
ROLE_NAMES = {v: k for k, v in ROLE_CODES.items()}
STATE_CODES = {"starting": 0, "ready": 1, "draining": 2, "dead": 3}
STATE_NAMES = {v: k for k, v in STATE_CODES.items()}


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: int
    role: str  # prefill | decode | mixed
    state: str = "ready"  # starting | ready | draining | dead
    heartbeat_s: float = 0.0
    queued_prefill_tokens: int = 0
    running_reqs: int = 0
    waiting_reqs: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    predicted_decode_tokens: int = 0
    """Sum over running + waiting decodes of their predicted remaining output tokens."""
    heavy_decodes: int = 0
    light_decodes: int = 0
    block_size: int = 16
    max_num_seqs: int = 0
    """Request slots of the worker's batch (`--max-num-seqs`); 0: not published."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in this worker's prefix cache, since it started (vLLM's name)."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose KV the cache held."""

    @property
    def alive(self) -> bool:
        return self.state in ("ready", "draining")

    @property
    def accepting(self) -> bool:
        return self.state == "ready"


@dataclass(frozen=True)
class ReqInfo:
    """What dispatch policies may know about a request."""

    req_id: str
    prompt_tokens: int
    max_tokens: int
    predicted_low_tokens: int | None = None
    """Low end of the predicted output-length bucket (None: no prediction)."""
    predicted_high_tokens: int | None = None
    arrival_s: float = 0.0
    priority: int = 0
    prefix_hashes: tuple = ()
    """Prefix-cache hashes of the prompt's leading full blocks that may come from a cache
    (`prefix_hash.cacheable_blocks`), for cache-aware dispatch; () when caching is off."""
    prefix_block_tokens: int = 0
    """Tokens per entry of `prefix_hashes`."""
