"""The front scheduler's types: a request's handoff state (`ReqState`), the scheduler's
settings (`FrontConfig`), its record of one request (`FrontReq`) and what each of its methods
returns (`Actions`: messages to send, requests to fail, and for an output event the entries
that are current). Pure code; `tetri.sched.front`
re-exports them all."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tetri.types import SamplingParams


class ReqState(enum.IntEnum):
    QUEUED = 0
    PREFILLING = 1
    AWAIT_DECODE = 2
    DECODING = 3


@dataclass(frozen=True)
class FrontConfig:
    chunk_size: int = 512
    prefill_policy: str = "fcfs"
    prefill_sched_batch: int = 16
    global_policy: str = "least-loaded"
    dispatch_policy: str = "least-loaded"
    heavy_decode_tokens: int = 128
    handoff_timeout_s: float = 120.0
    request_timeout_s: float = 600.0
    """No request lives longer than this in any state: it fails with an error instead of hanging."""
    chunks_ahead: int = 2
    """Chunks outstanding per prefill worker: the one running plus one queued behind it."""
    prefix_caching: bool = False
    """The workers cache prefix blocks: index them, and start each prompt's first chunk where
    its worker's cache is expected to end (the runtime mirrors `CacheConfig`)."""
    prefix_hash_seed: bytes = b""
    """`prefix_hash.hash_seed` of the model, as the workers compute it."""


@dataclass
class FrontReq:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    state: ReqState = ReqState.QUEUED
    prefill_worker: int | None = None
    decode_worker: int | None = None
    open_choices: set[int] = field(default_factory=set)
    first_sent: bool = False
    holds_prefill_blocks: bool = False
    aborting: bool = False
    deadline_s: float = float("inf")
    predicted_low_tokens: int | None = None
    expected_output_tokens: int | None = None
    prompt_text: str | None = None
    output_ids: list[int] = field(default_factory=list)
    """Tokens of choice 0 already sent to the client (what a migration re-prefills)."""
    migrations: int = 0
    priority: int = 0
    """vLLM's semantics: lower values first."""
    resume_tokens: int = 0
    """After a migration: how many of `output_ids` this incarnation re-prefills as context."""
    block_hashes: list[bytes] | None = None
    """Prefix-cache hashes of the context's full blocks (computed on each placement, when
    caching is on)."""
    hash_block_tokens: int = 0
    """Tokens per block of `block_hashes`."""

    @property
    def context_ids(self) -> list[int]:
        """What the workers prefill: the prompt, plus the outputs emitted before a migration."""
        if not self.resume_tokens:
            return self.prompt_token_ids
        return self.prompt_token_ids + self.output_ids[: self.resume_tokens]


@dataclass
class Actions:
    sends: list[tuple[int, object]] = field(default_factory=list)
    fails: list[tuple[str, str]] = field(default_factory=list)
    current: list[int] = field(default_factory=list)
    """Of an output event (`FrontScheduler.on_token_batch`: indices into the TokenBatch's
    entries; `chunk_done` / `on_chunk_done`: into the ChunkDone's `finished`), the entries from
    the worker that holds the request: the caller streams exactly these, the rest are stale.
    Belongs to the event that made it: `extend` leaves it as it is."""

    def send(self, worker_id: int, msg) -> Actions:
        self.sends.append((worker_id, msg))
        return self

    def extend(self, other: Actions) -> Actions:
        self.sends.extend(other.sends)
        self.fails.extend(other.fails)
        return self

