"""Decode-worker (instance-level) admission and batch selection policies.

A decode worker's core calls, every step:
  1. `admit(waiting, running, free_blocks, block_size, now)` -> ids of waiting handoffs to
     admit now, in order (their KV is then copied in and they join the batch);
  2. `schedule(running, max_seqs, free_blocks, block_size, now)` -> (ids to run this step,
     ids to preempt). Preempted requests release their device blocks (swapped to host or
     dropped for recompute by the worker) and come back through `admit` later.
Policies are pure: callers pass `now`; no clock reads, no I/O.

Requests in `running` that are in neither returned list stay resident (they keep their
blocks) but do not run this step. Stateful policies (MLFQ) also need two hooks, which every
policy here offers (as no-ops where stateless), so the worker may call them unconditionally:
  3. `on_step(run_ids, now)` after each decode step that ran `run_ids`;
  4. `forget(req_id)` when a request finishes or is aborted (not when it is preempted).

Policies (built by name with `tetri.sched.decode_registry.make_decode_policy(name, **kwargs)`;
the request view and the admission helpers live in `tetri.sched.decode_base`):
  greedy           vLLM: admit while the next token's blocks are free now.
  reserve-static   TetriInfer: admit while context + predicted remaining output (low end of
                   the bucket) fits in the blocks free now.
  reserve-dynamic  TetriInfer: admit while memory still suffices when the running job with
                   the shortest predicted remaining output finishes.
  mlfq             FastServe skip-join MLFQ with token-level preemption (`tetri.sched.mlfq`).
Invariant for all: the blocks the admitted requests need right now (context + 1 token, less
what they hold) never sum to more than `free_blocks`.

Priority (vLLM's semantics, `DecodeReqView.priority`: lower first): every policy admits in
priority order (arrival order within one priority), runs the best-priority requests first
and preempts the worst-priority, most recently admitted ones first. With one priority
everywhere the policies behave exactly as described above.
"""

from __future__ import annotations

from tetri.sched.decode_base import DecodePolicy, DecodeReqView, admit_in_order, admit_need_blocks, by_priority
from tetri.sched.kv_blocks import blocks_for_tokens

__all__ = ["DecodePolicy", "DecodeReqView", "GreedyDecodePolicy", "ReserveDynamicPolicy", "ReserveStaticPolicy",
           "admit_in_order", "admit_need_blocks", "blocks_at_step", "by_priority", "predicted_remaining_tokens"]


class GreedyDecodePolicy:
    """vLLM's rule: admit in arrival order while the blocks needed right now are free
    (context + the next token); run everything; when a step cannot grow every request,
    preempt the most recently admitted."""

    name = "greedy"

    def admit(self, waiting, running, free_blocks, block_size, now):
        return admit_in_order(by_priority(waiting), free_blocks,
                              lambda req: blocks_for_tokens(req.context_tokens + 1, block_size))

    def schedule(self, running, max_seqs, free_blocks, block_size, now):
        run = by_priority(running)[:max_seqs]
        preempt: list[str] = []
        while run:
            grow = sum(1 for r in run if r.context_tokens + 1 > r.held_blocks * block_size)
            if grow <= free_blocks:
                break
            victim = run.pop()
            preempt.append(victim.req_id)
            free_blocks += victim.held_blocks
        return [r.req_id for r in run], preempt

    def on_step(self, run_ids: list[str], now: float) -> None:
        """No state to update (present so a worker can call it on any policy)."""

    def forget(self, req_id: str) -> None:
        """No state to drop."""


def predicted_remaining_tokens(req: DecodeReqView) -> int:
    """Tokens still to generate per the prediction's low end, at least 1 (the next token)
    and at most what max_tokens allows. Without a prediction: 1, i.e. greedy's view."""
    cap = max(1, req.max_tokens - req.generated_tokens)
    if req.predicted_output_tokens is None:
        return 1
    return max(1, min(cap, req.predicted_output_tokens - req.generated_tokens))


class ReserveStaticPolicy(GreedyDecodePolicy):
    """TetriInfer reserve-static: admit in arrival order while the request's predicted
    footprint, blocks_for_tokens(context + predicted remaining low end), fits in the blocks
    free now (less what earlier admissions in this call reserved); stop at the first that
    does not fit (no overtaking, so a large request is not starved). Without a prediction it
    behaves as greedy. Batch selection and preemption are greedy's."""

    name = "reserve-static"

    def admit(self, waiting, running, free_blocks, block_size, now):
        def need(req: DecodeReqView) -> int:
            reserve = blocks_for_tokens(req.context_tokens + predicted_remaining_tokens(req), block_size)
            return max(admit_need_blocks(req, block_size), reserve - req.held_blocks)

        return admit_in_order(by_priority(waiting), free_blocks, need)


def blocks_at_step(reqs: list[DecodeReqView], steps: int, block_size: int) -> int:
    """Blocks `reqs` hold after `steps` more decode steps (none finishing before then)."""
    return sum(max(r.held_blocks, blocks_for_tokens(r.context_tokens + steps, block_size)) for r in reqs)


class ReserveDynamicPolicy(GreedyDecodePolicy):
    """TetriInfer reserve-dynamic: admit a waiting request (arrival order, stop at the first
    refusal) when memory still suffices at the moment the shortest job finishes.

    With S = running + already admitted + the candidate, and T = min over S of the predicted
    remaining tokens (the step at which the shortest job finishes and frees its blocks), every
    job in S grows one token per step until T, so the blocks needed then are
    sum_S max(held, blocks_for_tokens(context + T)). Admit when that, less the blocks S holds
    now, is <= free_blocks. T >= 1, so the candidate's immediate need is covered too."""

    name = "reserve-dynamic"

    def admit(self, waiting, running, free_blocks, block_size, now):
        batch = list(running)
        held_now = sum(r.held_blocks for r in batch)
        admitted = []
        for req in by_priority(waiting):
            trial = batch + [req]
            horizon_steps = min(predicted_remaining_tokens(r) for r in trial)
            extra = blocks_at_step(trial, horizon_steps, block_size) - held_now - req.held_blocks
            if extra > free_blocks:
                break
            batch = trial
            held_now += req.held_blocks
            admitted.append(req.req_id)
        return admitted
