"""Snapshots of worker load that policies decide from (pure data, no I/O).

`WorkerLoad` is what one row of the shared-memory load board (`tetri.control.load_board`)
decodes to; the front scheduler and the simulator both hand lists of these to the policies.
`fit_error` reads the rows' pool sizes to refuse, at once, a request no live pool can hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from tetri.sched.kv_blocks import blocks_for_tokens

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
    """Sum over running + waiting decodes (each choice) of their predicted remaining output
    tokens: the low end of the predicted bucket less the tokens generated so far."""
    heavy_decodes: int = 0
    """Requests held whose predicted output exceeds the worker's heavy_decode_tokens."""
    light_decodes: int = 0
    """The other requests held (also those without a prediction)."""
    block_size: int = 16
    max_num_seqs: int = 0
    """Request slots of the worker's batch (`--max-num-seqs`); 0: not published."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in this worker's prefix cache, since it started (vLLM's name)."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose KV the cache held."""
    host_prefix_cache_hits: int = 0
    """Of those, tokens found in the host tier (`--kv-offloading-size`) and uploaded."""
    kv_offloaded_blocks: int = 0
    """Cached blocks copied to the host tier on eviction."""
    kv_uploaded_blocks: int = 0
    """Host-tier blocks copied back to the GPU pool for a hit."""
    handoff_blocks_copied: int = 0
    """Decode workers: prompt blocks copied in from prefill workers, since it started."""
    handoff_blocks_cached: int = 0
    """Decode workers: prompt blocks of handoffs attached from its own prefix cache instead."""
    step_s: float = 0.0
    """Recent mean duration of the worker's steps (what one of its decodes waits per token);
    0: not published. The simulator and the load board publish it (a worker: an EWMA of its
    steps that did something)."""
    kv_swapped_out_blocks: int = 0
    """KV swap (`--swap-space`): blocks of preempted requests copied to the host, since it started."""
    kv_swapped_in_blocks: int = 0
    """Of those, blocks copied back into the pool (the request resumed)."""
    preemptions_swap: int = 0
    """Preemptions whose KV was swapped out (vLLM counts all in `num_preemptions_total`)."""
    preemptions_recompute: int = 0
    """Preemptions whose KV was freed, to be re-prefilled from prompt + output."""
    swapped_reqs: int = 0
    """Sequences swapped out now (vLLM's `num_requests_swapped`; copies in flight included)."""
    swap_held_blocks: int = 0
    """Host blocks swapped-out sequences hold now (0 once every one resumed or ended)."""
    interleaved_steps: int = 0
    """Mixed cores: steps that ran prompt tokens beside at least one decode, since the worker
    started (each such step slowed those decodes: the role policy's interference signal)."""
    prefill_busy_s: float = 0.0
    """Seconds the worker spent in steps that computed prompt tokens, since it started (its
    prefill busy fraction over a window: the role policy's split reads it)."""

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


def fit_error(prompt_tokens: int, n: int, loads: list[WorkerLoad]) -> str | None:
    """Why no live pool can hold a request of `prompt_tokens` with `n` choices, or None. A
    prefill pool must hold the prompt; a decode or mixed pool the prompt + 1 token for every
    choice (each choice gets its own blocks there). Only roles with a live worker are judged
    (none live: the caller answers 503 or parks the request)."""
    needs = {"prefill": lambda bs: blocks_for_tokens(prompt_tokens, bs),
             "decode": lambda bs: blocks_for_tokens(prompt_tokens + 1, bs) * n,
             "mixed": lambda bs: blocks_for_tokens(prompt_tokens + 1, bs) * n}
    live = [w for w in loads if w.alive and w.total_blocks > 0]
    for role, need in needs.items():
        rows = [w for w in live if w.role == role]
        if rows and all(need(w.block_size) > w.total_blocks for w in rows):
            most = max(rows, key=lambda w: w.total_blocks)
            each = f" for each of n={n} choices" if n > 1 and role != "prefill" else ""
            return (f"this request needs {need(most.block_size)} KV blocks of {most.block_size} tokens on a {role} "
                    f"worker ({prompt_tokens} prompt tokens{each}); the largest live {role} pool holds "
                    f"{most.total_blocks}")
    return None
