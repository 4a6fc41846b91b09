"""Disaggregated workers: one `PDWorker` per GPU whose role (prefill, decode or mixed) can flip.

Prefill role:
  - `whole_prompts` (mode `disagg`, DistServe): FCFS batches of whole prompts, adding
    prompts while the batch stays within `chunk_size` tokens (DistServe's L_m; one longer
    prompt runs alone);
  - otherwise (mode `tetri`): the real `ChunkPacker` (FCFS/SJF/LJF in groups of
    `sched_batch`) cuts the queue into fixed `chunk_size` chunks, one chunk per step.
  A prompt's KV blocks are reserved at its first piece and held until the decode worker has
  copied them (the real ownership protocol), so a decode backlog back-pressures prefill.
  The first token is out when the last piece's step ends (TTFT).
Decode role (the real decode core's step, `tetri.workers.decode`):
  1. admission: the decode policy (`make_decode_policy`) picks waiting handoffs; each one's
     KV copy (`CostModel.transfer_s`) is done synchronously inside the step, as the real
     core does, and the prefill side frees its blocks when the copy ends;
  2. preempted requests (recompute) are re-prefilled here when their blocks fit;
  3. the policy picks the batch (and preemptions: swapped out to the host instead of
     recomputed where `tetri.sim.swap` finds it cheaper; uploaded back when they fit); one
     decode token each.
Mixed role (mode `auto`): one step is the decode role's step plus prompt chunks filling the
rest of `chunk_size` tokens (Sarathi, as `colocated-chunked`); a prompt it prefilled stays
and decodes here (`adopt`: no copy), and it also takes handoffs from prefill workers.
"""

from __future__ import annotations

from collections import deque

from tetri.sched.chunking import ChunkPacker
from tetri.sched.decode_registry import make_decode_policy
from tetri.sched.dispatch import expected_output_tokens, is_heavy
from tetri.sim.costmodel import StepShape, add_shapes, decode_shape, piece_shape
from tetri.sim.requests import SimRequest
from tetri.sim.swap import SimSwap
from tetri.sim.workers import Plan, SimWorker, WorkerEnv, decode_context_tokens


class PrefillSide:
    def __init__(self, worker: PDWorker, whole_prompts: bool) -> None:
        self.w = worker
        env = worker.env
        self.whole_prompts = whole_prompts
        self.pass_tokens = env.prefill_chunk_tokens or env.chunk_size_tokens
        self.packer = ChunkPacker(max(self.pass_tokens, env.chunk_size_tokens), env.prefill_policy, env.sched_batch)
        self.fifo: deque[SimRequest] = deque()
        self.queued: dict[str, SimRequest] = {}
        """Not yet fully prefilled (some may hold blocks already)."""
        self.holding: dict[str, SimRequest] = {}
        """Prefilled; blocks held until the decode side has copied the KV."""
        self.fifo_tokens = 0
        self.started: set[str] = set()
        """Requests whose cached prefix was looked up (their first piece was packed)."""

    @property
    def queued_tokens(self) -> int:
        return self.fifo_tokens if self.whole_prompts else self.packer.queued_tokens

    def add(self, req: SimRequest) -> None:
        self.queued[req.req_id] = req
        if self.whole_prompts:
            self.fifo.append(req)
            self.fifo_tokens += req.prompt_tokens
        else:  # the chunks pack uncached tokens only (the worker computes any gap found later)
            self.packer.add(req.req_id, req.prompt_tokens, self.w.cached_tokens(req))

    def release(self, req: SimRequest) -> None:
        self.holding.pop(req.req_id, None)
        self.w.free_blocks(req)

    def resident(self) -> list[SimRequest]:
        return [*self.queued.values(), *self.holding.values()]

    def _reserve(self, req: SimRequest) -> bool:
        """Its first piece: attach the cached prefix once, then hold blocks for the prompt."""
        if req.req_id not in self.started:
            self.started.add(req.req_id)
            req.computed_tokens = self.w.attach_cached(req)
        return self.w.try_reserve(req, req.prompt_tokens)

    def _whole_batch(self) -> list[tuple[SimRequest, int, int, bool]]:
        batch: list[tuple[SimRequest, int, int, bool]] = []
        tokens = 0
        while self.fifo:
            req = self.fifo[0]
            if batch and tokens + req.prompt_tokens > self.w.env.chunk_size_tokens:
                break
            if not self._reserve(req):
                break
            self.fifo.popleft()
            self.fifo_tokens -= req.prompt_tokens
            begin = req.computed_tokens
            tokens += req.prompt_tokens - begin
            batch.append((req, begin, req.prompt_tokens - begin, True))
        return batch

    def _chunk(self, budget_tokens: int | None = None) -> list[tuple[SimRequest, int, int, bool]]:
        if not len(self.packer):
            return []
        pieces = self.packer.next_chunk(budget_tokens)
        out = []
        for i, p in enumerate(pieces):
            req = self.queued[p.req_id]
            if not self._reserve(req):
                for later in reversed(pieces[i:]):
                    self.packer.push_front(later)
                break
            begin, end = min(req.computed_tokens, p.start + p.num_tokens), p.start + p.num_tokens
            if begin == end and not p.is_last:
                continue  # wholly cached
            out.append((req, begin, end - begin, p.is_last))
        return out

    def plan(self, now: float) -> Plan | None:
        pieces = self._whole_batch() if self.whole_prompts else self._chunk(self.pass_tokens)
        if not pieces:
            return None
        shape = self.shape(pieces)
        step_s = self.w.env.cost.step_s(shape) + self.w.take_host_copy_s()  # uploads/offloads of this step
        return step_s, lambda end_s: self._end(pieces, end_s)

    def shape(self, pieces) -> StepShape:
        shape = StepShape()
        for _req, start, num_tokens, is_last in pieces:
            shape = add_shapes(shape, piece_shape(num_tokens, start, is_last))
        self.w.stats.prefill_tokens += shape.prefill_tokens
        return shape

    def _end(self, pieces, end_s: float) -> None:
        hooks = self.w.env.hooks
        for req, start, num_tokens, _ in pieces:
            req.computed_tokens = start + num_tokens
            self.w.commit_computed(req)
        evicted = self.w.blocks.take_evicted()
        if evicted:
            hooks.evicted(self.w, evicted)
        for req, _start, _num_tokens, is_last in pieces:
            if not is_last:
                continue
            del self.queued[req.req_id]
            self.started.discard(req.req_id)
            if req.emit(end_s):
                self.w.free_blocks(req)
                hooks.finished(req, self.w)
            else:
                self.holding[req.req_id] = req
                hooks.prefilled(req, self.w)


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

    def handoff(self, req: SimRequest) -> None:
        req.handoff_s = self.w.env.loop.now
        self.waiting[req.req_id] = req
        self._count(req, +1)

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
            copy_s += w.env.cost.transfer_s(req.kv_tokens)
            w.env.loop.at(now + copy_s, w.env.hooks.released, req, w)
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
    def __init__(self, worker_id: int, env: WorkerEnv, role: str, whole_prompts: bool) -> None:
        self.role = role  # before the allocator is built: a decode worker gets no host tier
        super().__init__(worker_id, env)
        self.prefill = PrefillSide(self, whole_prompts)
        self.decode = DecodeSide(self)

    def add(self, req: SimRequest) -> None:
        self.prefill.add(req)
        self.kick()

    def handoff(self, req: SimRequest) -> None:
        self.decode.handoff(req)
        self.kick()

    def release(self, req: SimRequest) -> None:
        self.prefill.release(req)
        self.kick()

    def adopt(self, req: SimRequest) -> None:
        self.prefill.holding.pop(req.req_id, None)
        self.decode.adopt(req)

    def plan_step(self, now: float) -> Plan | None:
        if self.role == "mixed":
            return self._plan_mixed(now)
        side = self.prefill if self.role == "prefill" else self.decode
        return side.plan(now)

    def _plan_mixed(self, now: float) -> Plan | None:
        """Chunked prefill (Sarathi): the decode step plus prompt pieces up to the chunk budget."""
        copy_s, run = self.decode.prepare(now)
        budget_tokens = self.env.chunk_size_tokens - len(run)
        pieces = self.prefill._chunk(budget_tokens) if budget_tokens > 0 else []
        if not run and not self.decode.resuming and copy_s == 0.0 and not pieces:
            return None
        shape = add_shapes(self.decode.shape(run), self.prefill.shape(pieces))
        duration_s = copy_s + (self.env.cost.step_s(shape) if shape != StepShape() else 0.0) + self.take_host_copy_s()

        def apply(end_s: float) -> None:
            self.decode._end(run, end_s)
            self.prefill._end(pieces, end_s)
        return duration_s, apply

    def resident(self) -> list[SimRequest]:
        return [*self.prefill.resident(), *self.decode.resident()]

    def load(self):
        if self.role == "prefill":
            return self.base_load(queued_prefill_tokens=self.prefill.queued_tokens,
                                  running_reqs=len(self.prefill.holding), waiting_reqs=len(self.prefill.queued))
        d = self.decode
        queued = self.prefill.queued_tokens if self.role == "mixed" else 0
        prompts = len(self.prefill.queued) if self.role == "mixed" else 0
        return self.base_load(queued_prefill_tokens=queued, running_reqs=len(d.running) + len(d.resuming),
                              waiting_reqs=len(d.waiting) + len(d.recompute) + len(d.swap.swapped) + prompts,
                              predicted_decode_tokens=d.predicted_tokens, heavy_decodes=d.heavy,
                              light_decodes=d.num_reqs - d.heavy)
