"""The event loop and what every simulated worker shares.

A worker is step-driven: `kick()` asks it to plan its next forward pass when it is idle;
planning returns the pass's duration (from the cost model) and a callback that applies the
pass's effects (tokens out, requests moved) at its end; then the worker plans again. So a
worker decides with the state at the start of a step, as a real continuous-batching worker
does, and what arrives during a step waits for the next one.

Workers talk to the front in the real protocol (`tetri.protocol`): `receive` takes the
front's messages (ChunkPlan, SubmitMixed, Handoff, Release, Abort, SetRole); the tokens a
step emitted leave at its end as one `TokenBatch` (a prefill worker's first tokens ride on
its `ChunkDone` instead), through the cluster's hooks to `SimFront`.

The load board (`board_row`, what the front reads): a prefill or decode worker's row is
published where the real worker shell writes it (`tetri/workers/proc.py`: drain the socket,
step, write the row): at the end of each step, with the step's effects and not the messages
that came during it (they wait, as in the socket, and are handled right after the write),
and when messages were handled and no step follows. So a handoff shows on its decode
worker's row from the end of the step that admits it (or of the first idle turn), never from
the start of a step, and the front picks level 2 from the same rows as on the real server.
Level 1 reads the front's own account of a prefill worker's queue, not its lagging row
(`FrontScheduler._view`). A mixed worker's row is its live state (`SHELL_ROWS`).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable, Protocol

from tetri.protocol import Abort, ChunkPlan, Handoff, Release, SetRole, SubmitMixed, TokenBatch
from tetri.sched.decode_policy import DecodeReqView
from tetri.sched.kv_blocks import BlockAllocator, blocks_for_tokens
from tetri.sched.load import WorkerLoad
from tetri.sim.costmodel import CostModel
from tetri.sim.requests import SimRequest


class EventLoop:
    """A heap of (time, sequence, callback, args); ties run in scheduling order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self.events = 0
        self.stopped = False

    def at(self, time_s: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (max(time_s, self.now), next(self._seq), fn, args))

    def stop(self) -> None:
        self.stopped = True

    @property
    def idle(self) -> bool:
        """No event is scheduled (besides the one running now)."""
        return not self._heap

    def run(self, until_s: float = float("inf")) -> bool:
        """Run events up to `until_s` or a stop(); True when the heap emptied (all done)."""
        while self._heap and not self.stopped:
            time_s, _, fn, args = self._heap[0]
            if time_s > until_s:
                return False
            heapq.heappop(self._heap)
            self.now = time_s
            self.events += 1
            fn(*args)
        return not self.stopped


class ClusterHooks(Protocol):
    """What workers tell the cluster: protocol messages for the front, and the requests that
    finished (the client's side of the stream)."""

    def chunk_done(self, msg) -> None: ...

    def kv_copied(self, msg) -> None: ...

    def token_batch(self, msg) -> None: ...

    def set_role(self, worker: SimWorker, role: str) -> None: ...

    def finished(self, req: SimRequest, worker: SimWorker) -> None: ...


@dataclass
class WorkerStats:
    steps: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    forced_admissions: int = 0


@dataclass
class WorkerEnv:
    """Per-worker knobs and shared services (one instance for the whole cluster)."""

    loop: EventLoop
    cost: CostModel
    hooks: ClusterHooks
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    chunk_size_tokens: int = 512
    max_batched_tokens: int = 8192
    prefill_policy: str = "fcfs"
    sched_batch: int = 16
    decode_policy: str = "greedy"
    heavy_decode_tokens: int = 128
    check_invariants: bool = False
    stats: dict[int, WorkerStats] = field(default_factory=dict)
    prefix_caching: bool = False
    host_blocks: int = 0
    """Prefix-cache host tier per worker (`--kv-offloading-size`), in blocks."""
    swap_blocks: int = 0
    """Host blocks per decode worker for swapped-out KV (`--swap-space`; `tetri.sim.swap`)."""
    preemption_mode: str = "auto"
    step_budget: str = "fixed"
    """Mixed steps' prompt budget: "slo" fits it to step_tpot_s (`tetri.sched.step_budget`)."""
    step_tpot_s: float | None = None
    reqs: dict[str, SimRequest] = field(default_factory=dict)
    """Every request by id: a message names a request, the simulated state lives here."""


STEP_EWMA = 0.2
Plan = tuple[float, Callable[[float], None]]
"""A planned step: (duration_s, apply(end_s))."""


SHELL_ROWS = ("prefill", "decode")
"""Roles whose board row is published the shell's way (the module doc); a mixed row is live."""

_HANDLERS = {ChunkPlan: "submit_plan", SubmitMixed: "submit_mixed", Handoff: "handoff", Release: "release",
             Abort: "abort", SetRole: "set_role"}


class SimWorker:
    role = "mixed"

    def __init__(self, worker_id: int, env: WorkerEnv) -> None:
        self.worker_id = worker_id
        self.env = env
        self.blocks = BlockAllocator(env.num_blocks, env.block_size, enable_caching=env.prefix_caching,
                                     host_blocks=env.host_blocks if self.role != "decode" else env.swap_blocks,
                                     on_copy=self._host_copied,  # as tetri-serve: on decode, the swap space only
                                     offload_evicted=self.role != "decode")
        self.host_copy_blocks = 0
        """Blocks the host tier copied (either way) since the last `take_host_copy_s`."""
        self.busy = False
        self.paused = False
        self.step_s = 0.0
        """Moving mean of this worker's step durations (`WorkerLoad.step_s`)."""
        self.stats = env.stats.setdefault(worker_id, WorkerStats())
        self.held_blocks: dict[str, int] = {}
        """req_id -> blocks it owns in `self.blocks` (a cache of the allocator's answer)."""
        self.out_ids: list[str] = []
        self.out_reasons: list[str | None] = []
        """Tokens emitted in this step (request, finish reason): the step's TokenBatch."""
        self.out_chunk_done = None
        """The step's ChunkDone (prefill pieces ran), sent at its end after the inbox."""
        self.row: WorkerLoad | None = None
        """The load-board row as last published (`board_row`; `SHELL_ROWS` roles)."""
        self.inbox: list = []
        """`SHELL_ROWS` roles: the front's messages that came during the step under way."""

    # ---- the front's messages ----------------------------------------------------
    def receive(self, msg) -> None:
        """One message from the front (the caller kicks the worker after delivering them all);
        a prefill or decode worker in a step handles it after the step's row is written (`board_row`)."""
        if self.busy and self.role in SHELL_ROWS:
            self.inbox.append(msg)
            return
        getattr(self, _HANDLERS[type(msg)])(msg)

    # ---- the load board ------------------------------------------------------------
    def board_row(self) -> WorkerLoad:
        """The row the front reads: a prefill or decode worker's as last published, a mixed one's live."""
        if self.role not in SHELL_ROWS:
            return self.load()
        if self.row is None or self.row.role != self.role:  # first read, or just flipped (idle)
            self.publish()
        return self.row

    def publish(self) -> None:
        """The real shell's row write, at the end of a loop turn (the module doc)."""
        self.row = self.load() if self.role in SHELL_ROWS else None  # (a mixed row is live)

    def set_role(self, msg: SetRole) -> None:
        self.env.hooks.set_role(self, msg.role)

    def submit_mixed(self, msg: SubmitMixed) -> None:
        self.add(self.env.reqs[msg.req_id])

    def add(self, req: SimRequest) -> None:
        raise NotImplementedError(f"worker {self.worker_id} ({self.role}) takes no whole requests")

    def emitted(self, req: SimRequest, done: bool) -> None:
        """`req` emitted a token in this step (it goes out in the step's TokenBatch)."""
        self.out_ids.append(req.req_id)
        self.out_reasons.append("length" if done else None)

    # ---- the step cycle --------------------------------------------------------
    def kick(self) -> None:
        if self.busy or self.paused:
            return
        plan = self.plan_step(self.env.loop.now)
        if plan is None:
            self.publish()  # messages handled, no step: the shell writes the row after the turn
            return
        duration_s, apply = plan
        self.step_s += STEP_EWMA * (duration_s - self.step_s)
        self.busy = True
        self.stats.steps += 1
        self.stats.busy_s += duration_s
        self.env.loop.at(self.env.loop.now + duration_s, self._end_step, apply)

    def _end_step(self, apply: Callable[[float], None]) -> None:
        self.busy = False
        apply(self.env.loop.now)
        self.publish()  # the row: this step's effects, before what came during it
        inbox, self.inbox = self.inbox, []
        for msg in inbox:
            self.receive(msg)
        if self.out_chunk_done is not None:  # after the inbox: the front's answers queue behind it
            msg, self.out_chunk_done = self.out_chunk_done, None
            self.env.hooks.chunk_done(msg)
        if self.out_ids:
            ids, reasons, self.out_ids, self.out_reasons = self.out_ids, self.out_reasons, [], []
            zeros = [0] * len(ids)
            self.env.hooks.token_batch(TokenBatch(worker_id=self.worker_id, req_ids=ids, choices=zeros,
                                                  token_ids=zeros, finish_reasons=reasons,
                                                  evicted_hashes=self.blocks.take_evicted()))
        if self.env.check_invariants:
            self.check()
        self.kick()

    def plan_step(self, now: float) -> Plan | None:
        raise NotImplementedError

    # ---- blocks ------------------------------------------------------------------
    def _host_copied(self, src_ids: list[int], dst_ids: list[int], to_host: bool) -> None:
        self.host_copy_blocks += len(src_ids)

    def take_host_copy_s(self) -> float:
        """Time of the host-tier copies asked for since the last call (they run in the step)."""
        blocks, self.host_copy_blocks = self.host_copy_blocks, 0
        return self.env.cost.host_copy_s(blocks * self.env.block_size)

    def held(self, req: SimRequest) -> int:
        return self.held_blocks.get(req.req_id, 0)

    def try_reserve(self, req: SimRequest, tokens: int) -> bool:
        """Grow `req`'s blocks to hold `tokens` tokens if they are free now."""
        held = self.held_blocks.get(req.req_id, 0)
        if tokens <= held * self.env.block_size:
            return True
        need = blocks_for_tokens(tokens, self.env.block_size) - held
        if need > self.blocks.num_free:
            return False
        self.blocks.allocate(req.req_id, need)
        self.held_blocks[req.req_id] = held + need
        return True

    def attach_cached(self, req: SimRequest) -> int:
        """Before its first piece: attach the prompt's cached leading blocks (the real
        prefill worker's lookup); returns the cached tokens."""
        if not self.blocks.caching or not req.block_keys:
            return 0
        hit = self.blocks.lookup(req.req_id, req.block_keys, req.prompt_tokens)
        self.held_blocks[req.req_id] = len(self.blocks.blocks_of(req.req_id))
        return hit

    def cached_tokens(self, req: SimRequest) -> int:
        """What `attach_cached` would find now (no side effects)."""
        if not self.blocks.caching or not req.block_keys:
            return 0
        return self.blocks.cached_prefix_blocks(req.block_keys) * self.env.block_size

    def commit_computed(self, req: SimRequest) -> None:
        if self.blocks.caching and req.block_keys:
            self.blocks.commit(req.req_id, req.block_keys[:req.computed_tokens // self.env.block_size])

    def free_blocks(self, req: SimRequest) -> None:
        self.blocks.free(req.req_id)
        self.held_blocks.pop(req.req_id, None)

    def check(self) -> None:
        """Debug mode: the allocator's invariants plus 'only live requests own blocks'."""
        self.blocks.check_invariants()
        live = {r.req_id for r in self.resident()}
        stray = [o for o in self.blocks.owners() if o not in live]
        if stray:
            raise AssertionError(f"worker {self.worker_id}: blocks owned by non-resident {stray[:5]}")
        actual = {o: len(self.blocks.blocks_of(o)) for o in self.blocks.owners()}
        if actual != {k: v for k, v in self.held_blocks.items() if v}:
            raise AssertionError(f"worker {self.worker_id}: block-count cache out of sync with the allocator")

    def resident(self) -> list[SimRequest]:
        """Requests that may own blocks here."""
        raise NotImplementedError

    def load(self) -> WorkerLoad:
        raise NotImplementedError

    def base_load(self, **fields) -> WorkerLoad:
        return WorkerLoad(worker_id=self.worker_id, role=self.role, heartbeat_s=self.env.loop.now,
                          free_blocks=self.blocks.num_free, total_blocks=self.blocks.num_blocks,
                          block_size=self.env.block_size, max_num_seqs=self.env.max_num_seqs, step_s=self.step_s,
                          **fields)

    # ---- continuous-batching decode, shared by every role that decodes -------------
    def decode_round(self, running: dict[str, SimRequest], policy, now: float,
                     on_preempt: Callable[[SimRequest], None],
                     swap: Callable[[SimRequest], bool] | None = None) -> list[SimRequest]:
        """Ask the decode policy which running requests step (and which to preempt: swapped
        out when `swap` takes them, else their blocks are freed for recompute); reserve the
        blocks the stepping ones grow into."""
        if not running:
            return []
        held = self.held_blocks.get
        # SimRequest.view() inlined: this line runs once per request per step.
        views = [DecodeReqView(r.req_id, r.prompt_tokens + r.generated_tokens, r.generated_tokens, r.max_tokens,
                               r.info.predicted_low_tokens, r.arrival_s, held(r.req_id, 0))
                 for r in running.values()]
        bs = self.env.block_size
        run_ids, preempt_ids = policy.schedule(views, self.env.max_num_seqs, self.blocks.num_free, bs, now)
        for req_id in preempt_ids:
            req = running.pop(req_id)
            self.stats.preemptions += 1
            if swap is not None and swap(req):
                continue
            self.free_blocks(req)
            req.recompute = True
            on_preempt(req)
        run = []
        for req_id in run_ids:
            req = running[req_id]
            tokens = req.prompt_tokens + req.generated_tokens
            if tokens <= held(req_id, 0) * bs or self.try_reserve(req, tokens):
                run.append(req)
        return run

    def finish_decodes(self, run: list[SimRequest], running: dict[str, SimRequest], policy,
                       end_s: float) -> list[SimRequest]:
        """Every request in `run` emits one token at `end_s`; finished ones leave (returned)."""
        policy.on_step([r.req_id for r in run], end_s)
        self.stats.decode_tokens += len(run)
        done = []
        for req in run:
            # SimRequest.emit() inlined (hot loop).
            req.token_times_s.append(end_s)
            req.generated_tokens += 1
            if req.generated_tokens >= req.output_tokens:
                req.done_s = end_s
                running.pop(req.req_id, None)
                self.free_blocks(req)
                policy.forget(req.req_id)
                done.append(req)
                self.out_ids.append(req.req_id)
                self.out_reasons.append("length")
                self.env.hooks.finished(req, self)
            else:
                self.out_ids.append(req.req_id)
                self.out_reasons.append(None)
        return done


def decode_context_tokens(run: list[SimRequest]) -> int:
    """Context the step's decode tokens attend to, each including itself."""
    return sum(r.prompt_tokens + r.generated_tokens for r in run)
