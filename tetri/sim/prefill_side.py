"""The prefill half of a simulated `PDWorker`, with the real role cores' semantics.

Prefill role (`tetri.workers.prefill`): it runs the `ChunkPlan`s the front sent, one per
step, in order. A prompt's cached prefix is attached when its first piece comes up; each
piece's blocks are allocated before its step, and when the whole plan does not fit the
free blocks its leading pieces that do fit run and the rest stays at the head
(`ChunkDone(partial=True)`). A prefilled prompt's blocks are held until the front's
`Release` (its KV was copied by a decode worker), so a decode backlog back-pressures
prefill. At the step's end the first tokens of the prompts whose last piece ran leave in
the `ChunkDone` (`PrefillResult`s): that is TTFT.

Mixed role (`tetri.workers.mixed`, mode auto): the prompts the front sent whole
(`SubmitMixed`) wait in the worker's own `ChunkPacker` and fill what the decode batch leaves
of `chunk_size` tokens (Sarathi, as `colocated-chunked`); a prompt's blocks are reserved
whole at its first piece, and it decodes here (`DecodeSide.adopt`: no copy). Plans sent
before an in-place flip to mixed still run first.
"""

from __future__ import annotations

from collections import deque

from tetri.protocol import ChunkDone, ChunkPlan, PrefillResult
from tetri.sched.chunking import ChunkPacker
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sim.costmodel import StepShape, add_shapes, piece_shape
from tetri.sim.requests import SimRequest
from tetri.sim.workers import Plan

Piece = tuple[SimRequest, int, int, bool]
"""(request, first token computed, tokens computed, is its last piece)."""


class PrefillSide:
    def __init__(self, worker) -> None:
        self.w = worker
        env = worker.env
        self.plans: deque[ChunkPlan] = deque()
        self.plan_tokens = 0
        self.packer = ChunkPacker(env.chunk_size_tokens, env.prefill_policy, env.sched_batch)
        """The mixed role's own queue (SubmitMixed prompts)."""
        self.queued: dict[str, SimRequest] = {}
        """Not yet fully prefilled (some may hold blocks already)."""
        self.holding: dict[str, SimRequest] = {}
        """Prefilled; blocks held until the front's Release."""
        self.own: set[str] = set()
        """SubmitMixed prompts: they decode here."""
        self.started: set[str] = set()
        """Requests whose cached prefix was looked up (their first piece came up)."""

    @property
    def queued_tokens(self) -> int:
        return self.plan_tokens + self.packer.queued_tokens

    # ---- the front's messages -----------------------------------------------------
    def submit_plan(self, plan: ChunkPlan) -> None:
        for p in plan.pieces:
            if p.new is not None:
                self.queued.setdefault(p.req_id, self.w.env.reqs[p.req_id])
            self.plan_tokens += p.num_tokens
        self.plans.append(plan)

    def add_own(self, req: SimRequest) -> None:
        """SubmitMixed: the chunks pack uncached tokens only (the worker computes any gap found later)."""
        self.queued[req.req_id] = req
        self.own.add(req.req_id)
        self.packer.add(req.req_id, req.prompt_tokens, self.w.cached_tokens(req))

    def release(self, req_id: str) -> None:
        """Release (or Abort): free whatever the request holds here."""
        req = self.holding.pop(req_id, None) or self.queued.pop(req_id, None)
        if req is not None:
            self.started.discard(req_id)
            self.own.discard(req_id)
            self.packer.remove(req_id)
            self.w.free_blocks(req)

    def resident(self) -> list[SimRequest]:
        return [*self.queued.values(), *self.holding.values()]

    # ---- planning --------------------------------------------------------------------
    def _look_up(self, req: SimRequest) -> None:
        if req.req_id not in self.started:
            self.started.add(req.req_id)
            req.computed_tokens = self.w.attach_cached(req)

    def _plan_pieces(self) -> tuple[tuple[int, bool] | None, list[Piece]]:
        """The head plan's leading pieces that fit the free blocks: ((chunk id, partial), pieces),
        or (None, []) while not even its first live piece fits."""
        if not self.plans:
            return None, []
        plan = self.plans[0]
        bs, need, k = self.w.env.block_size, 0, len(plan.pieces)
        for i, p in enumerate(plan.pieces):
            req = self.queued.get(p.req_id)
            if req is None:
                continue  # released or aborted: needs nothing
            self._look_up(req)
            need += max(0, blocks_for_tokens(p.start + p.num_tokens, bs) - self.w.held(req))
            if need > self.w.blocks.num_free:
                k = i
                break
        if k == 0:
            return None, []
        pieces, rest = plan.pieces[:k], plan.pieces[k:]
        if rest:
            self.plans[0] = ChunkPlan(chunk_id=plan.chunk_id, pieces=rest)
        else:
            self.plans.popleft()
        out = []
        for p in pieces:
            self.plan_tokens -= p.num_tokens
            req = self.queued.get(p.req_id)
            if req is None:
                continue
            end = p.start + p.num_tokens
            self.w.try_reserve(req, end)
            begin = min(req.computed_tokens, end)
            if begin < end or p.is_last:
                out.append((req, begin, end - begin, p.is_last))
        return (plan.chunk_id, bool(rest)), out

    def own_chunk(self, budget_tokens: int) -> list[Piece]:
        """Mixed role: pieces of its own queue within `budget_tokens` (whole prompt's blocks
        reserved at its first piece)."""
        if budget_tokens <= 0 or not len(self.packer):
            return []
        pieces = self.packer.next_chunk(budget_tokens)
        out = []
        for i, p in enumerate(pieces):
            req = self.queued[p.req_id]
            self._look_up(req)
            if not self.w.try_reserve(req, req.prompt_tokens):
                for later in reversed(pieces[i:]):
                    self.packer.push_front(later)
                break
            begin, end = min(req.computed_tokens, p.start + p.num_tokens), p.start + p.num_tokens
            if begin == end and not p.is_last:
                continue  # wholly cached
            out.append((req, begin, end - begin, p.is_last))
        return out

    def plan(self, now: float) -> Plan | None:
        """A prefill-role step: the next plan (or its leading pieces that fit)."""
        head, pieces = self._plan_pieces()
        if head is None:
            return None
        shape = self.shape(pieces)
        step_s = (self.w.env.cost.step_s(shape) if shape != StepShape() else 0.0) + self.w.take_host_copy_s()
        return step_s, lambda end_s: self.end_plan(head, pieces, end_s)

    def shape(self, pieces: list[Piece]) -> StepShape:
        shape = StepShape()
        for _req, start, num_tokens, is_last in pieces:
            shape = add_shapes(shape, piece_shape(num_tokens, start, is_last))
        self.w.stats.prefill_tokens += shape.prefill_tokens
        return shape

    # ---- step end ---------------------------------------------------------------------
    def end_plan(self, head: tuple[int, bool], pieces: list[Piece], end_s: float) -> None:
        chunk_id, partial = head
        results = self.end(pieces, end_s)
        self.w.out_chunk_done = ChunkDone(worker_id=self.w.worker_id, chunk_id=chunk_id, finished=results,
                                          partial=partial, evicted_hashes=self.w.blocks.take_evicted())
        # (sent at the step's end, after the messages that came during it: `SimWorker._end_step`)

    def end(self, pieces: list[Piece], end_s: float) -> list[PrefillResult]:
        """Commit the computed blocks; the prompts whose last piece ran emit their first
        token: own ones decode on here, the front's are held (their PrefillResults returned)."""
        for req, start, num_tokens, _ in pieces:
            req.computed_tokens = start + num_tokens
            self.w.commit_computed(req)
        hooks, results = self.w.env.hooks, []
        for req, _start, _num_tokens, is_last in pieces:
            if not is_last:
                continue
            del self.queued[req.req_id]
            self.started.discard(req.req_id)
            done = req.emit(end_s)
            if req.req_id in self.own:
                self.own.discard(req.req_id)
                self.w.emitted(req, done)
                if done:
                    self.w.free_blocks(req)
                    hooks.finished(req, self.w)
                else:
                    self.w.decode.adopt(req)
                continue
            self.holding[req.req_id] = req
            results.append(PrefillResult(req_id=req.req_id, block_ids=[], num_prompt_tokens=req.prompt_tokens,
                                         first_tokens=[0], finish_reasons=["length" if done else None]))
            if done:
                hooks.finished(req, self.w)
        return results
