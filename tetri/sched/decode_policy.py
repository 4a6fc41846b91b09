"""Decode-worker (instance-level) admission and batch selection policies.

A decode worker's core calls, every step:
  1. `admit(waiting, running, free_blocks, block_size, now)` -> ids of waiting handoffs to
     admit now, in order (their KV is then copied in and they join the batch);
  2. `schedule(running, max_seqs, free_blocks, block_size, now)` -> (ids to run this step,
     ids to preempt). Preempted requests release their device blocks (swapped to host or
     dropped for recompute by the worker) and come back through `admit` later.
Policies are pure: callers pass `now`; no clock reads, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tetri.sched.kv_blocks import blocks_for_tokens


@dataclass(frozen=True)
class DecodeReqView:
    req_id: str
    context_tokens: int
    """Tokens whose KV the request holds or will hold when admitted (prompt + generated)."""
    generated_tokens: int
    max_tokens: int
    predicted_output_tokens: int | None = None
    arrival_s: float = 0.0
    held_blocks: int = 0


class DecodePolicy(Protocol):
    def admit(self, waiting: list[DecodeReqView], running: list[DecodeReqView],
              free_blocks: int, block_size: int, now: float) -> list[str]: ...

    def schedule(self, running: list[DecodeReqView], max_seqs: int, free_blocks: int,
                 block_size: int, now: float) -> tuple[list[str], list[str]]: ...


class GreedyDecodePolicy:
    """vLLM's rule: admit in arrival order while the blocks needed right now are free
    (context + the next token); run everything; when a step cannot grow every request,
    preempt the most recently admitted."""

    name = "greedy"

    def admit(self, waiting, running, free_blocks, block_size, now):
        admitted = []
        for req in waiting:
            need = blocks_for_tokens(req.context_tokens + 1, block_size)
            if need > free_blocks:
                break
            free_blocks -= need
            admitted.append(req.req_id)
        return admitted

    def schedule(self, running, max_seqs, free_blocks, block_size, now):
        run = list(running[:max_seqs])
        preempt: list[str] = []
        while run:
            grow = sum(1 for r in run if r.context_tokens + 1 > r.held_blocks * block_size)
            if grow <= free_blocks:
                break
            victim = run.pop()
            preempt.append(victim.req_id)
            free_blocks += victim.held_blocks
        return [r.req_id for r in run], preempt
