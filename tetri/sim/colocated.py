"""Colocated workers: prefill and decode on the same GPU.

`ColocatedWorker` (mode `colocated`) is vLLM as of early 2024 (v0.2.x), TetriInfer's
baseline: when prompts wait and fit, a step prefills a batch of WHOLE prompts (FCFS, up to
`max_batched_tokens` prompt tokens and `max_num_seqs` sequences, KV blocks for the whole
prompt reserved with a 1% watermark) and every running decode stalls for it (prefill
priority); otherwise a step decodes the running batch. Preemption is by recompute: the
newest running requests drop their KV and go back to the FRONT of the waiting queue.

`ChunkedWorker` (mode `colocated-chunked`) is Sarathi-Serve / vLLM with chunked prefill:
each step runs every scheduled decode plus prompt pieces from the real `ChunkPacker`
filling the rest of a `chunk_size` token budget (decodes count one token each; with
`step_budget` "slo", the prompt budget that fits the TPOT SLO, `tetri.sim.mixed_budget`). A prompt's
blocks are reserved when its first piece is packed; preempted requests re-enter the packer
(at the back) to recompute. When running decodes cannot grow, half-prefilled prompts give
their blocks back first (newest first; they restart later): otherwise a running request
and a half-prefilled one can preempt each other forever, neither making progress.

Both use the real greedy decode policy (`tetri.sched.decode_policy`) for batch selection
and preemption.
"""

from __future__ import annotations

from collections import deque

from tetri.sched.chunking import ChunkPacker, ChunkPiece
from tetri.sched.decode_registry import make_decode_policy
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sim.costmodel import StepShape, add_shapes, decode_shape, piece_shape
from tetri.sim.mixed_budget import SimStepBudget
from tetri.sim.requests import SimRequest
from tetri.sim.workers import Plan, SimWorker, WorkerEnv, decode_context_tokens

WATERMARK_SHARE = 0.01


class ColocatedWorker(SimWorker):
    role = "mixed"

    def __init__(self, worker_id: int, env: WorkerEnv) -> None:
        super().__init__(worker_id, env)
        self.policy = make_decode_policy("greedy")
        self.waiting: deque[SimRequest] = deque()
        self.running: dict[str, SimRequest] = {}
        self.in_prefill: list[SimRequest] = []
        self.queued_tokens = 0
        self.watermark_blocks = max(1, int(WATERMARK_SHARE * env.num_blocks))

    def add(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self.queued_tokens += req.kv_tokens
        self.kick()

    def _requeue_front(self, req: SimRequest) -> None:
        self.waiting.appendleft(req)
        self.queued_tokens += req.kv_tokens

    def resident(self) -> list[SimRequest]:
        return [*self.running.values(), *self.in_prefill]

    def load(self):
        return self.base_load(queued_prefill_tokens=self.queued_tokens, running_reqs=len(self.running),
                              waiting_reqs=len(self.waiting))

    def _take_prefills(self) -> list[SimRequest]:
        batch: list[SimRequest] = []
        tokens = 0
        while self.waiting:
            req = self.waiting[0]
            n = req.kv_tokens
            if batch and tokens + n > self.env.max_batched_tokens:
                break
            if len(self.running) + len(batch) >= self.env.max_num_seqs:
                break
            need = blocks_for_tokens(n, self.env.block_size)
            reserve = self.watermark_blocks if (batch or self.running) else 0
            if self.blocks.num_free - need < reserve or not self.try_reserve(req, n):
                break
            self.waiting.popleft()
            self.queued_tokens -= n
            batch.append(req)
            tokens += n
        return batch

    def plan_step(self, now: float) -> Plan | None:
        batch = self._take_prefills()
        if batch:
            shape = StepShape()
            for req in batch:
                shape = add_shapes(shape, piece_shape(req.kv_tokens, 0, sample=not req.recompute))
            self.in_prefill = batch
            self.stats.prefill_tokens += shape.prefill_tokens
            return self.env.cost.step_s(shape), lambda end_s: self._end_prefill(batch, end_s)
        preempted: list[SimRequest] = []
        run = self.decode_round(self.running, self.policy, now, preempted.append)
        for req in reversed(preempted):  # the policy preempts newest first; keep the oldest at the head
            self._requeue_front(req)
        if not run:
            return None
        duration_s = self.env.cost.decode_s(len(run), decode_context_tokens(run))
        return duration_s, lambda end_s: self.finish_decodes(run, self.running, self.policy, end_s)

    def _end_prefill(self, batch: list[SimRequest], end_s: float) -> None:
        self.in_prefill = []
        for req in batch:
            _prompt_done(self, req, end_s)


class ChunkedWorker(SimWorker):
    role = "mixed"

    def __init__(self, worker_id: int, env: WorkerEnv) -> None:
        super().__init__(worker_id, env)
        self.policy = make_decode_policy("greedy")
        self.packer = ChunkPacker(env.chunk_size_tokens, env.prefill_policy, env.sched_batch)
        self.prefilling: dict[str, SimRequest] = {}
        self.started: dict[str, None] = {}
        """Prompts being prefilled that hold their blocks (an ordered set, oldest first)."""
        self.running: dict[str, SimRequest] = {}
        self.budget = SimStepBudget(env)

    def add(self, req: SimRequest) -> None:
        self.prefilling[req.req_id] = req
        self.packer.add(req.req_id, req.kv_tokens)
        self.kick()

    def resident(self) -> list[SimRequest]:
        return [*self.running.values(), *(self.prefilling[r] for r in self.started)]

    def load(self):
        return self.base_load(queued_prefill_tokens=self.packer.queued_tokens, running_reqs=len(self.running),
                              waiting_reqs=len(self.prefilling))

    def _pack(self, budget_tokens: int) -> list[ChunkPiece]:
        """Pieces for this step; a prompt's first piece needs its whole KV and a free seq slot."""
        if budget_tokens <= 0 or not len(self.packer):
            return []
        pieces = self.packer.next_chunk(budget_tokens)
        active = len(self.running) + len(self.started)
        for i, piece in enumerate(pieces):
            if piece.start == 0:
                req = self.prefilling[piece.req_id]
                if active >= self.env.max_num_seqs or not self.try_reserve(req, req.kv_tokens):
                    for later in reversed(pieces[i:]):
                        self.packer.push_front(later)
                    return pieces[:i]
                self.started[piece.req_id] = None
                active += 1
        return pieces

    def _make_room(self) -> None:
        """Release half-prefilled prompts (newest first) until the decodes can grow."""
        if not self.started or self.blocks.num_free >= len(self.running):
            return
        bs = self.env.block_size
        need = sum(1 for r in self.running.values() if r.prompt_tokens + r.generated_tokens + 1 > self.held(r) * bs)
        for req_id in reversed(list(self.started)):
            if self.blocks.num_free >= need:
                return
            req = self.prefilling[req_id]
            del self.started[req_id]
            self.packer.remove(req_id)
            self.free_blocks(req)
            self.packer.add(req_id, req.kv_tokens)
            self.stats.preemptions += 1

    def plan_step(self, now: float) -> Plan | None:
        self._make_room()
        run = self.decode_round(self.running, self.policy, now, self.add_preempted)
        pieces = self._pack(self.budget.prompt_budget(run))
        if not run and not pieces:
            return None
        shape = decode_shape(len(run), decode_context_tokens(run)) if run else StepShape()
        for p in pieces:
            sample = p.is_last and not self.prefilling[p.req_id].recompute
            shape = add_shapes(shape, piece_shape(p.num_tokens, p.start, sample))
        self.stats.prefill_tokens += shape.prefill_tokens
        duration_s = self.env.cost.step_s(shape)
        self.budget.observe(run, shape, duration_s)
        return duration_s, lambda end_s: self._end(run, pieces, end_s)

    def add_preempted(self, req: SimRequest) -> None:
        self.prefilling[req.req_id] = req
        self.packer.add(req.req_id, req.kv_tokens)

    def _end(self, run: list[SimRequest], pieces: list[ChunkPiece], end_s: float) -> None:
        self.finish_decodes(run, self.running, self.policy, end_s)
        for piece in pieces:
            if not piece.is_last:
                continue
            req = self.prefilling.pop(piece.req_id)
            self.started.pop(piece.req_id, None)
            _prompt_done(self, req, end_s)


def _prompt_done(worker: SimWorker, req: SimRequest, end_s: float) -> None:
    """A prompt's last piece ran on a colocated worker: a recompute resumes decoding; a new
    request emits its first token and decodes on, unless that token finished it."""
    if req.recompute:
        req.recompute = False
    elif req.emit(end_s):
        worker.emitted(req, True)
        worker.free_blocks(req)
        worker.env.hooks.finished(req, worker)
        return
    else:
        worker.emitted(req, False)
    worker.running[req.req_id] = req
