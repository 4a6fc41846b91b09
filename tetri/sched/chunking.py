"""Fixed-size chunk packing of queued prompts (TetriInfer's chunked prefill), pure code.

Prompts wait in a raw queue. When the scheduled queue runs short, the next group of up to
`sched_batch` raw prompts is ordered by the prefill policy (FCFS keeps arrival order, SJF
shortest prompt first, LJF longest first) and appended; sorting only inside a group means
no prompt waits behind more than one group of later arrivals (no starvation). The packer
then cuts the scheduled queue, in order, into chunks of exactly `chunk_size` tokens:

    scheduled: R1[700] R2[300] R3[100]        chunk_size = 512
    chunk 1:   R1[0:512]
    chunk 2:   R1[512:700] R2[0:300] R3[0:24]
    chunk 3:   R3[24:100]                      (the queue ran dry: a short last chunk)

A prompt is never reordered once its first piece has been packed (non-preemptive).

`whole_prompts` (DistServe's prefill batching, mode `disagg`): a chunk never splits a
prompt; it takes whole prompts in order while they fit `chunk_size` tokens, and a longer
prompt alone.

Priority (vLLM's semantics: lower values first). The raw queue is kept in (priority,
arrival) order, so a group takes the best-priority prompts first and sorts them by
priority before the policy's key; a prompt that arrives with a better priority than
scheduled prompts that have not started goes ahead of them. With one priority everywhere
this is exactly the order above.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass

PREFILL_POLICIES = ("fcfs", "sjf", "ljf")


@dataclass(frozen=True)
class ChunkPiece:
    req_id: str
    start: int
    """Position of the piece's first token in the prompt."""
    num_tokens: int
    is_last: bool
    """The prompt's final piece: the worker samples the first output token after it."""


@dataclass
class _Pending:
    req_id: str
    num_tokens: int
    cursor: int = 0
    priority: int = 0
    order: int = 0
    started: bool = False
    """A piece of it was packed: it is not reordered any more."""

    @property
    def rank(self) -> tuple[int, int]:
        return (self.priority, self.order)


class ChunkPacker:
    def __init__(self, chunk_size: int, policy: str = "fcfs", sched_batch: int = 16,
                 whole_prompts: bool = False) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {policy!r}")
        if sched_batch < 1:
            raise ValueError("sched_batch must be >= 1")
        self.chunk_size = chunk_size
        self.policy = policy
        self.sched_batch = sched_batch
        self.whole_prompts = whole_prompts
        self._raw: list[_Pending] = []  # in (priority, arrival) order
        self._scheduled: deque[_Pending] = deque()
        self._queued_tokens = 0
        self._orders = itertools.count()

    def __len__(self) -> int:
        return len(self._raw) + len(self._scheduled)

    def __contains__(self, req_id: str) -> bool:
        return any(p.req_id == req_id for p in (*self._scheduled, *self._raw))

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens not yet packed into a chunk."""
        return self._queued_tokens

    def add(self, req_id: str, num_tokens: int, start: int = 0, priority: int = 0, order: int | None = None) -> None:
        """Queue a prompt's tokens [start, num_tokens) for prefill. `priority`: lower first;
        `order`: its place among equal priorities (default: arrival order here)."""
        if not 0 <= start < num_tokens:
            raise ValueError("need 0 <= start < num_tokens")
        entry = _Pending(req_id, num_tokens, start, priority, next(self._orders) if order is None else order)
        self._queued_tokens += num_tokens - start
        # ahead of scheduled prompts of a worse priority that have not started
        at = next((i for i, p in enumerate(self._scheduled) if not p.started and p.priority > priority), None)
        if at is not None:
            self._scheduled.insert(at, entry)
        else:
            bisect.insort(self._raw, entry, key=lambda p: p.rank)

    def remove(self, req_id: str) -> bool:
        """Drop a prompt's unpacked tokens (abort). Returns whether it was queued."""
        for queue in (self._scheduled, self._raw):
            for p in queue:
                if p.req_id == req_id:
                    queue.remove(p)
                    self._queued_tokens -= p.num_tokens - p.cursor
                    return True
        return False

    def push_front(self, piece: ChunkPiece) -> None:
        """Return a packed piece that could not run to the head of the queue (it runs next)."""
        head = self._scheduled[0] if self._scheduled else None
        if head is not None and head.req_id == piece.req_id:
            head.cursor = piece.start
        else:
            self._scheduled.appendleft(_Pending(piece.req_id, piece.start + piece.num_tokens, piece.start,
                                                started=True))
        self._queued_tokens += piece.num_tokens

    def _refill(self) -> None:
        group, self._raw = self._raw[: self.sched_batch], self._raw[self.sched_batch:]
        if self.policy == "sjf":
            group.sort(key=lambda p: (p.priority, p.num_tokens - p.cursor))
        elif self.policy == "ljf":
            group.sort(key=lambda p: (p.priority, -(p.num_tokens - p.cursor)))
        self._scheduled.extend(group)

    def next_chunk(self, budget_tokens: int | None = None) -> list[ChunkPiece]:
        """Pack the next chunk: up to `budget_tokens` (default chunk_size) tokens, in order. A
        mixed step's SLO-aware budget (`tetri.sched.step_budget`) may exceed chunk_size."""
        budget = self.chunk_size if budget_tokens is None else budget_tokens
        pieces: list[ChunkPiece] = []
        while budget > 0:
            if not self._scheduled:
                if not self._raw:
                    break
                self._refill()
            head = self._scheduled[0]
            left = head.num_tokens - head.cursor
            if self.whole_prompts and left > budget:
                if pieces:
                    break  # it runs in the next chunk, whole
                budget = left  # a prompt longer than the chunk runs alone
            take = min(budget, left)
            is_last = head.cursor + take == head.num_tokens
            pieces.append(ChunkPiece(head.req_id, head.cursor, take, is_last))
            head.cursor += take
            head.started = True
            budget -= take
            self._queued_tokens -= take
            if is_last:
                self._scheduled.popleft()
        return pieces
