"""Disaggregated workers: one `PDWorker` per GPU whose role (prefill, decode or mixed) can flip.

Prefill role: `tetri.sim.prefill_side` (the ChunkPlans the front sends, one per step; in
mode `disagg` the front's packer never splits a prompt: DistServe's whole-prompt batches up
to `chunk_size` tokens, one longer prompt alone).
Decode role (the real decode core's step, `tetri.workers.decode`):
  1. admission: the front's `Handoff`s wait; the decode policy (`make_decode_policy`) picks
     which to admit; each one's KV copy (`CostModel.transfer_s`) is done synchronously
     inside the step, as the real core does, and its `KVCopied` goes to the front when the
     copy ends (the front then Releases the prefill side's blocks);
  2. preempted requests (recompute) are re-prefilled here when their blocks fit;
  3. the policy picks the batch (and preemptions: swapped out to the host instead of
     recomputed where `tetri.sim.swap` finds it cheaper; uploaded back when they fit); one
     decode token each, out in the step's `TokenBatch`.
Mixed role (mode `auto`): one step is the decode role's step plus prompt pieces filling the
rest of `chunk_size` tokens (Sarathi, as `colocated-chunked`; with `step_budget` "slo" the
prompt budget that fits the declared TPOT, `tetri.sim.mixed_budget`); the prompts the front sent it
whole (`SubmitMixed`) decode here.
"""

from __future__ import annotations

from dataclasses import replace

from tetri.protocol import Handoff, KVCopied
from tetri.sched.decode_registry import make_decode_policy
from tetri.sched.dispatch import expected_output_tokens, is_heavy
from tetri.sim.costmodel import StepShape, add_shapes, decode_shape, piece_shape
from tetri.sim.mixed_budget import SimStepBudget
from tetri.sim.prefill_side import PrefillSide
from tetri.sim.requests import SimRequest
from tetri.sim.swap import SimSwap
from tetri.sim.workers import Plan, SimWorker, WorkerEnv, decode_context_tokens


class DecodeSide:
    def __init__(self, worker: PDWorker) -> None:
        self.w = worker
        self.policy = make_decode_policy(worker.env.decode_policy)
        self.waiting: dict[str, SimRequest] = {}
        self.running: dict[str, SimRequest] = {}
        self.recompute: dict[str, SimRequest] = {}
        self.swap = SimSwap(worker, worker.env.preemption_mode)
        self.resuming: list[SimRequest] = []
        self.heavy = 0
        self.predicted_tokens = 0

    def _count(self, req: SimRequest, sign: int) -> None:
        self.heavy += sign * is_heavy(req.info, self.w.env.heavy_decode_tokens)
        self.predicted_tokens += sign * expected_output_tokens(req.info)

    def handoff(self, msg: Handoff) -> None:
        """The front's Handoff: the request waits for admission, with the predicted length."""
        req = self.w.env.reqs[msg.req_id]
        req.info = replace(req.info, predicted_low_tokens=msg.predicted_output_tokens)
        req.decode_worker = self.w.worker_id
        req.handoff_s = self.w.env.loop.now
        self.waiting[req.req_id] = req
        self._count(req, +1)

    def drop(self, req_id: str) -> None:
        """Abort: forget the request wherever it is here, and free its blocks."""
        for where in (self.waiting, self.running, self.recompute):
            req = where.pop(req_id, None)
            if req is not None:
                self._count(req, -1)
                self.w.free_blocks(req)

    def resident(self) -> list[SimRequest]:
        return [*self.running.values(), *self.resuming]

    @property
    def num_reqs(self) -> int:
        return (len(self.waiting) + len(self.running) + len(self.recompute) + len(self.resuming)
                + len(self.swap.swapped))

    def _admit(self, now: float) -> float:
        """Admit handoffs the policy accepts; returns the seconds their KV copies take."""
        if not self.waiting:
            return 0.0
        w = self.w
        views = [r.view(0) for r in self.waiting.values()]
        running = [r.view(w.held(r)) for r in self.running.values()]
        ids = self.policy.admit(views, running, w.blocks.num_free, w.env.block_size, now)
        idle = not self.running and not self.recompute and not self.swap.swapped
        if not ids and idle and w.blocks.num_free == w.blocks.num_blocks:
            ids = [views[0].req_id]  # nothing resident could ever free memory: admit the head anyway
            w.stats.forced_admissions += 1
        copy_s = 0.0
        for req_id in ids:
            req = self.waiting[req_id]
            if not w.try_reserve(req, req.prompt_tokens + req.generated_tokens):
                break
            del self.waiting[req_id]
            self.running[req_id] = req
            one_s = w.env.cost.transfer_s(req.kv_tokens)
            copy_s += one_s
            w.env.loop.at(now + copy_s, w.env.hooks.kv_copied,
                          KVCopied(worker_id=w.worker_id, req_id=req_id, num_bytes=0, seconds=one_s))
        return copy_s

    def _resume(self) -> list[SimRequest]:
        resumed = []
        for req_id, req in list(self.recompute.items()):
            if not self.w.try_reserve(req, req.prompt_tokens + req.generated_tokens):
                break
            del self.recompute[req_id]
            resumed.append(req)
        return resumed

    def adopt(self, req: SimRequest) -> None:
        """A mixed worker decodes what it prefilled: its prompt blocks stay, no copy."""
        req.handoff_s = self.w.env.loop.now
        req.decode_worker = self.w.worker_id
        self.running[req.req_id] = req
        self._count(req, +1)

    def prepare(self, now: float) -> tuple[float, list[SimRequest]]:
        """Admission, the decode batch and resumes for this step: (copy seconds, the batch)."""
        copy_s = self._admit(now)
        swaps = self.w.role == "decode" and self.w.blocks.host is not None  # as tetri-serve: the decode core only
        run = self.w.decode_round(self.running, self.policy, now, self._preempted, self.swap.out if swaps else None)
        self.swap.resume(self.running)
        self.resuming = self._resume()
        if self.w.role == "decode":  # (a mixed step adds its host copies itself)
            copy_s += self.w.take_host_copy_s()  # swap copies asked for in this step
        return copy_s, run

    def shape(self, run: list[SimRequest]) -> StepShape:
        shape = decode_shape(len(run), decode_context_tokens(run)) if run else StepShape()
        for req in self.resuming:
            shape = add_shapes(shape, piece_shape(req.kv_tokens, 0, sample=False))
        return shape

    def plan(self, now: float) -> Plan | None:
        copy_s, run = self.prepare(now)
        if not run and not self.resuming and copy_s == 0.0:
            return None
        shape = self.shape(run)
        duration_s = copy_s + (self.w.env.cost.step_s(shape) if shape != StepShape() else 0.0)
        return duration_s, lambda end_s: self._end(run, end_s)

    def _preempted(self, req: SimRequest) -> None:
        self.recompute[req.req_id] = req

    def _end(self, run: list[SimRequest], end_s: float) -> None:
        for req in self.resuming:
            req.recompute = False
            self.running[req.req_id] = req
        self.resuming = []
        for req in self.w.finish_decodes(run, self.running, self.policy, end_s):
            self._count(req, -1)


class PDWorker(SimWorker):
    def __init__(self, worker_id: int, env: WorkerEnv, role: str) -> None:
        self.role = role  # before the allocator is built: a decode worker gets no host tier
        super().__init__(worker_id, env)
        self.prefill = PrefillSide(self)
        self.decode = DecodeSide(self)
        self.budget = SimStepBudget(env)  # the mixed role's per-step prompt budget (step_budget)
        self.interleaved_steps = 0
        self.prefill_busy_s = 0.0

    # ---- the front's messages (the cluster kicks the worker after delivering them) ---------
    def submit_plan(self, msg) -> None:
        self.prefill.submit_plan(msg)

    def add(self, req: SimRequest) -> None:
        self.prefill.add_own(req)

    def handoff(self, msg: Handoff) -> None:
        self.decode.handoff(msg)

    def release(self, msg) -> None:
        self.prefill.release(msg.req_id)

    def abort(self, msg) -> None:
        self.prefill.release(msg.req_id)
        self.decode.drop(msg.req_id)

    # ---- steps -----------------------------------------------------------------------
    def plan_step(self, now: float) -> Plan | None:
        if self.role == "mixed" or self._mixed_leftover():
            return self._plan_mixed(now)
        side = self.prefill if self.role == "prefill" else self.decode
        plan = side.plan(now)
        if plan is not None and self.role == "prefill":  # the board's prefill_busy_s (RolePolicy split)
            self.prefill_busy_s += plan[0]
        return plan

    def _mixed_leftover(self) -> bool:
        """(In-place flips out of mixed, as `tetri.workers.side_cores`.) The old mixed core's
        work still here: a decode worker's own prompts (or plans from before a flip to mixed),
        a prefill worker's decodes; until it is done the worker steps as mixed (one fused step
        where the server steps the two cores one after the other); no new work of the phase it
        gave up arrives (the front routes by the new role)."""
        if self.role == "decode":
            return bool(self.prefill.own or self.prefill.plans)
        return self.role == "prefill" and bool(self.decode.num_reqs or self.decode.resuming or self.prefill.own)

    def _plan_mixed(self, now: float) -> Plan | None:
        """Chunked prefill (Sarathi): the decode step plus prompt pieces up to the chunk budget
        (plans the front sent before an in-place flip to mixed run first)."""
        copy_s, run = self.decode.prepare(now)
        head, pieces = self.prefill._plan_pieces() if self.prefill.plans else (None, [])
        if head is None:
            resumed = sum(r.kv_tokens for r in self.decode.resuming)  # (step_budget "slo": the SLO's budget)
            pieces = self.prefill.own_chunk(self.budget.prompt_budget(run, copy_s, resumed))
        if not run and not self.decode.resuming and copy_s == 0.0 and not pieces and head is None:
            return None
        self.interleaved_steps += bool(run and pieces)  # the board's interference signal (RolePolicy split)
        shape = add_shapes(self.decode.shape(run), self.prefill.shape(pieces))
        step_s = self.env.cost.step_s(shape) if shape != StepShape() else 0.0
        self.budget.observe(run, shape, step_s)  # (feeds the step budget's fit; no-op when fixed)
        duration_s = copy_s + step_s + self.take_host_copy_s()
        self.prefill_busy_s += duration_s if pieces else 0.0

        def apply(end_s: float) -> None:
            self.decode._end(run, end_s)
            if head is not None:
                self.prefill.end_plan(head, pieces, end_s)
            else:
                self.prefill.end(pieces, end_s)
        return duration_s, apply

    def resident(self) -> list[SimRequest]:
        return [*self.prefill.resident(), *self.decode.resident()]

    def load(self):
        d = self.decode
        if self.role == "prefill":  # as the real prefill node's board: prefilling, and prefilled (held)
            return self.base_load(queued_prefill_tokens=self.prefill.queued_tokens,  # (+ decodes left by a flip
                                  running_reqs=len(self.prefill.queued) + len(d.running) + len(d.resuming),
                                  waiting_reqs=len(self.prefill.holding) + len(d.waiting) + len(d.recompute)
                                  + len(d.swap.swapped), interleaved_steps=self.interleaved_steps,  # out of mixed)
                                  prefill_busy_s=self.prefill_busy_s)
        # (a decode worker's prefill side is empty but for prompts left by a flip out of mixed)
        queued = self.prefill.queued_tokens if self.role != "prefill" else 0
        prompts = len(self.prefill.queued) if self.role != "prefill" else 0
        return self.base_load(queued_prefill_tokens=queued, running_reqs=len(d.running) + len(d.resuming),
                              waiting_reqs=len(d.waiting) + len(d.recompute) + len(d.swap.swapped) + prompts,
                              predicted_decode_tokens=d.predicted_tokens, heavy_decodes=d.heavy,
                              light_decodes=d.num_reqs - d.heavy, interleaved_steps=self.interleaved_steps,
                              prefill_busy_s=self.prefill_busy_s)
