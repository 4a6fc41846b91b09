"""FastServe's skip-join multi-level feedback queue for a decode worker (papers.md §3.2-3.3).

Contract (same `DecodePolicy` interface as `tetri.sched.decode_base`, plus two hooks the
decode worker MUST call, because this policy keeps per-request state):
  - `admit(waiting, running, free_blocks, block_size, now)` -> ids to admit, highest priority
    first, while their immediate need (context + 1 token, less held blocks) fits; stops at
    the first that does not fit, so a lower-priority request never overtakes a higher one.
  - `schedule(running, max_seqs, free_blocks, block_size, now)` -> (run, preempt): the
    `max_seqs` highest-priority resident requests run this step (token-level preemption: the
    others pause, keeping their KV). Then, when the run set cannot grow by one token each, or
    free blocks would drop below `reserve_free_blocks`, paused requests are preempted
    (blocks released) from the lowest priority up; if the run set still cannot grow, its
    lowest-priority members are preempted too. FastServe keeps this reserve for arrivals
    and offloads the lowest-priority resident jobs first.
  - `on_step(run_ids, now)` after every decode step, with the ids that ran: each gains one
    step of attained service; a request whose service at its level reaches that level's
    quantum is demoted one level (to the back of that queue) with its service reset.
  - `forget(req_id)` when a request finishes or is aborted (NOT when preempted: a preempted
    request keeps its level and comes back through `admit`).

Levels: level i (0 = highest priority) has quantum `base_quantum_steps * 2**i` decode steps
(FastServe: q1 = one iteration, doubling). Service is counted in decode steps because a
decode step of a batch costs about the same for every member.

Skip-join: on first sight (in `admit` or `schedule`) a request's first-iteration cost is
estimated from its prompt length, FastServe-style: `ceil(prompt_tokens / prompt_tokens_per_step)`
decode-step equivalents (default 64 prompt tokens per step, from FastServe's example: a
1024-token prefill ~0.08 s vs ~0.005 s per decode step). It joins the highest-priority level
whose quantum covers that cost: min{i : quantum(i) >= cost}, capped at the lowest level.
prompt_tokens = context_tokens - generated_tokens.

Starvation: a request that has not run for `starvation_s` (measured from its last step, or
from when the policy first saw it) is promoted to level 0 with its service reset (checked in
every `admit` and `schedule`). FastServe's paper default is 0.3 s.

Order within a level is FIFO by the time the request entered the level. A request's own
`priority` (vLLM's semantics: lower first) ranks above the levels: the queues order by
(priority, level, entry).
"""

from __future__ import annotations

from dataclasses import dataclass

from tetri.sched.decode_base import DecodeReqView, admit_in_order, admit_need_blocks


@dataclass
class MLFQEntry:
    level: int
    service_steps: int
    last_run_s: float
    enter_seq: int


def skip_join_level(prompt_tokens: int, prompt_tokens_per_step: int, base_quantum_steps: int,
                    num_levels: int) -> int:
    """The highest-priority level whose quantum covers the first-iteration cost."""
    cost_steps = max(1, -(-prompt_tokens // prompt_tokens_per_step))
    level = 0
    while level < num_levels - 1 and base_quantum_steps * 2**level < cost_steps:
        level += 1
    return level


class MLFQDecodePolicy:
    """Skip-join MLFQ with token-level preemption; see the module docstring."""

    name = "mlfq"

    def __init__(self, num_levels: int = 8, base_quantum_steps: int = 1,
                 prompt_tokens_per_step: int = 64, starvation_s: float = 0.3,
                 reserve_free_blocks: int = 0) -> None:
        if num_levels < 1 or base_quantum_steps < 1 or prompt_tokens_per_step < 1:
            raise ValueError("num_levels, base_quantum_steps, prompt_tokens_per_step must be >= 1")
        if starvation_s <= 0 or reserve_free_blocks < 0:
            raise ValueError("starvation_s must be > 0 and reserve_free_blocks >= 0")
        self.num_levels = num_levels
        self.base_quantum_steps = base_quantum_steps
        self.prompt_tokens_per_step = prompt_tokens_per_step
        self.starvation_s = starvation_s
        self.reserve_free_blocks = reserve_free_blocks
        self._entries: dict[str, MLFQEntry] = {}
        self._seq = 0

    def quantum_steps(self, level: int) -> int:
        return self.base_quantum_steps * 2**level

    def level_of(self, req_id: str) -> int | None:
        entry = self._entries.get(req_id)
        return None if entry is None else entry.level

    def entry(self, req_id: str) -> MLFQEntry | None:
        return self._entries.get(req_id)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _track(self, reqs: list[DecodeReqView], now: float) -> None:
        """Skip-join unseen requests; promote starved ones to level 0."""
        for req in reqs:
            entry = self._entries.get(req.req_id)
            if entry is None:
                level = skip_join_level(req.context_tokens - req.generated_tokens,
                                        self.prompt_tokens_per_step, self.base_quantum_steps,
                                        self.num_levels)
                self._entries[req.req_id] = MLFQEntry(level, 0, now, self._next_seq())
            elif now - entry.last_run_s >= self.starvation_s and entry.level > 0:
                entry.level = 0
                entry.service_steps = 0
                entry.enter_seq = self._next_seq()

    def _priority_order(self, reqs: list[DecodeReqView]) -> list[DecodeReqView]:
        def key(req: DecodeReqView) -> tuple[int, int, int]:
            entry = self._entries[req.req_id]
            return (req.priority, entry.level, entry.enter_seq)

        return sorted(reqs, key=key)

    def admit(self, waiting, running, free_blocks, block_size, now):
        self._track(list(waiting), now)
        return admit_in_order(self._priority_order(list(waiting)), free_blocks,
                              lambda req: admit_need_blocks(req, block_size))

    def schedule(self, running, max_seqs, free_blocks, block_size, now):
        self._track(list(running), now)
        order = self._priority_order(list(running))
        run, paused = order[:max_seqs], order[max_seqs:]
        preempt: list[str] = []

        def growth_blocks() -> int:
            return sum(1 for r in run if r.context_tokens + 1 > r.held_blocks * block_size)

        while paused and free_blocks - growth_blocks() < self.reserve_free_blocks:
            victim = paused.pop()
            if victim.held_blocks > 0:
                preempt.append(victim.req_id)
                free_blocks += victim.held_blocks
        while run and growth_blocks() > free_blocks:
            victim = run.pop()
            preempt.append(victim.req_id)
            free_blocks += victim.held_blocks
        return [r.req_id for r in run], preempt

    def on_step(self, run_ids: list[str], now: float) -> None:
        """Account one decode step to each id that ran; demote on quantum exhaustion."""
        for req_id in run_ids:
            entry = self._entries.get(req_id)
            if entry is None:
                continue
            entry.service_steps += 1
            entry.last_run_s = now
            if entry.service_steps >= self.quantum_steps(entry.level) and entry.level < self.num_levels - 1:
                entry.level += 1
                entry.service_steps = 0
                entry.enter_seq = self._next_seq()

    def forget(self, req_id: str) -> None:
        """Drop a finished or aborted request's state."""
        self._entries.pop(req_id, None)
