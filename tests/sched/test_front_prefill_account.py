"""Level 1 reads the front's own account of each prefill worker's queue, not the board row.

The worker shell writes its row after each step, so the plans the front just sent are missing
from it for a step or more. The front knows exactly what it gave each prefill worker: the
tokens in its packer, the tokens of the plans sent whose ChunkDone has not come, and the
requests placed there not yet released (`FrontScheduler._view`). Here the board rows never
change (the lag at its worst: a burst within one step), and level 1 still balances."""

from __future__ import annotations

import random

from tetri.protocol import ChunkDone, ChunkPlan, KVCopied, PrefillResult
from tetri.sched.front import FrontConfig, FrontReq, FrontScheduler
from tetri.sched.load import WorkerLoad
from tetri.types import SamplingParams

ROWS = [WorkerLoad(worker_id=0, role="prefill", free_blocks=64, total_blocks=64),
        WorkerLoad(worker_id=1, role="prefill", free_blocks=64, total_blocks=64),
        WorkerLoad(worker_id=2, role="decode", free_blocks=64, total_blocks=64)]
"""The rows as the shell last wrote them (before any step): empty queues."""


def _front() -> FrontScheduler:
    return FrontScheduler(FrontConfig(chunk_size=32), random.Random(0))


def _add(front: FrontScheduler, i: int, tokens: int):
    req = FrontReq(f"r{i}", list(range(5, 5 + tokens)), SamplingParams(max_tokens=4), 0.0)
    return front.add(req, ROWS, 0.0)


def _queued(front: FrontScheduler) -> dict[int, tuple[int, int, int]]:
    return {w.worker_id: (w.queued_prefill_tokens, w.running_reqs, w.waiting_reqs)
            for w in front._view(ROWS) if w.role == "prefill"}


def test_a_burst_on_rows_that_lag_is_spread_by_what_the_front_sent():
    front = _front()
    picks = []
    for i in range(6):  # 40 tokens each: two plans (32 + 8) leave the packer at once, its queue empties
        _add(front, i, 40)
        picks.append(front.reqs[f"r{i}"].prefill_worker)
    assert picks == [0, 1, 0, 1, 0, 1]  # from the rows and the packers alone: 0, 0, 1, 1, 0, 1 (r1 joined r0)
    assert _queued(front) == {0: (120, 3, 0), 1: (120, 3, 0)}


def test_the_account_follows_chunk_done_partial_runs_and_handoffs():
    front = _front()
    plans = [m for _, m in _add(front, 0, 40).sends if isinstance(m, ChunkPlan)]
    assert [sum(p.num_tokens for p in plan.pieces) for plan in plans] == [32, 8]
    assert _queued(front)[0] == (40, 1, 0)
    # a partial run: the plan's tokens still count (the worker is short of blocks)
    front.on_chunk_done(ChunkDone(worker_id=0, chunk_id=plans[0].chunk_id, finished=[], partial=True), ROWS, 0.0)
    assert _queued(front)[0] == (40, 1, 0)
    front.on_chunk_done(ChunkDone(worker_id=0, chunk_id=plans[0].chunk_id, finished=[]), ROWS, 0.0)
    assert _queued(front)[0] == (8, 1, 0)
    res = PrefillResult(req_id="r0", block_ids=[0, 1, 2], num_prompt_tokens=40, first_tokens=[7],
                        finish_reasons=[None])
    acts = front.on_chunk_done(ChunkDone(worker_id=0, chunk_id=plans[1].chunk_id, finished=[res]), ROWS, 0.0)
    assert any(wid == 2 for wid, _ in acts.sends)  # handed off to the decode worker
    assert _queued(front)[0] == (0, 0, 1)  # prefilled, its blocks held for the copy
    front.on_kv_copied(KVCopied(worker_id=2, req_id="r0", num_bytes=0, seconds=0.0))
    assert _queued(front)[0] == (0, 0, 0)


def test_a_dead_worker_is_forgotten():
    front = _front()
    _add(front, 0, 40)
    front.on_worker_dead(0)
    assert 0 not in front.sent_tokens and not front._sent_plans
    _add(front, 1, 40)  # worker 0 restarted (its row ready again): nothing of r0 counts there
    assert front.reqs["r1"].prefill_worker == 0 and _queued(front) == {0: (40, 1, 0), 1: (0, 0, 0)}
