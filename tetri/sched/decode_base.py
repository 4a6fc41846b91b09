"""What every decode policy shares: the request view a policy sees, the policy interface,
and the admission helpers (`tetri.sched.decode_policy` and `tetri.sched.mlfq` both build on
this module; `tetri.sched.decode_registry` builds a policy by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

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
    priority: int = 0
    """vLLM's semantics: lower values first."""


def by_priority(reqs: Iterable[DecodeReqView]) -> list[DecodeReqView]:
    """Lower priority values first; the given (arrival or admission) order within one."""
    return sorted(reqs, key=lambda r: r.priority)


class DecodePolicy(Protocol):
    def admit(self, waiting: list[DecodeReqView], running: list[DecodeReqView],
              free_blocks: int, block_size: int, now: float) -> list[str]: ...

    def schedule(self, running: list[DecodeReqView], max_seqs: int, free_blocks: int,
                 block_size: int, now: float) -> tuple[list[str], list[str]]: ...


def admit_in_order(reqs: Iterable[DecodeReqView], free_blocks: int,
                   need_blocks: Callable[[DecodeReqView], int]) -> list[str]:
    """Ids of `reqs`, in order, while each one's `need_blocks` fits in what is left of
    `free_blocks`; stops at the first that does not (no overtaking)."""
    admitted = []
    for req in reqs:
        need = need_blocks(req)
        if need > free_blocks:
            break
        free_blocks -= need
        admitted.append(req.req_id)
    return admitted


def admit_need_blocks(req: DecodeReqView, block_size: int) -> int:
    """Blocks a request needs right now to be admitted and decode one step."""
    return max(0, blocks_for_tokens(req.context_tokens + 1, block_size) - req.held_blocks)
