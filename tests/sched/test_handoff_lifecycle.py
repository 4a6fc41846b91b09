"""The handoff state machine (`tetri.sched.handoff`, through `FrontScheduler`'s event methods)
driven by random event sequences against a model of the workers' side of the protocol:
messages queue per worker and arrive in order, at any interleaving; workers die (with or
without migration) and come back; the clock jumps. Invariants checked after every event and
once everything drained:
  - each prefill hold (a prompt prefilled, its blocks kept) is Released exactly once (an
    Abort that freed it first makes the Release a documented no-op, never a second free);
  - no request outlives its deadline (after `expire(now)`);
  - no Actions for a request already gone, except the documented `Release`;
  - every abort ends in the request gone (once the decode worker's Dropped, a death or the
    deadline came), and at the end nothing is held anywhere;
  - the client's stream (only the entries `Actions.current` lists) of choice 0 is 0, 1, 2, ...:
    nothing duplicated or missing across migrations, nothing stale.
"""

from __future__ import annotations

import random
from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tetri.protocol import (Abort, ChunkDone, ChunkPlan, Dropped, Handoff, KVCopied, PrefillResult, Release,
                            TokenBatch)
from tetri.sched.dispatch import NoWorker
from tetri.sched.front import FrontConfig, FrontReq, FrontScheduler, ReqState
from tetri.sched.load import WorkerLoad
from tetri.types import SamplingParams

ROLES = {0: "prefill", 1: "prefill", 2: "decode", 3: "decode"}
CFG = FrontConfig(chunk_size=8, handoff_timeout_s=5.0, request_timeout_s=20.0)


class Violation(AssertionError):
    pass


class PrefillSide:
    def __init__(self) -> None:
        self.plans: deque[ChunkPlan] = deque()
        self.live: dict[str, int] = {}  # req -> prior output tokens (its first token's position)
        self.max_tokens: dict[str, int] = {}
        self.held: set[str] = set()
        self.abort_freed: set[str] = set()

    def handle(self, msg) -> list:
        if isinstance(msg, ChunkPlan):
            for p in msg.pieces:
                if p.new is not None:
                    self.live[p.req_id] = p.new.prior_output_tokens
                    self.max_tokens[p.req_id] = p.new.params.max_tokens
                    self.abort_freed.discard(p.req_id)
            self.plans.append(msg)
        elif isinstance(msg, Abort):
            self.live.pop(msg.req_id, None)
            if msg.req_id in self.held:
                self.held.discard(msg.req_id)
                self.abort_freed.add(msg.req_id)
        elif isinstance(msg, Release):
            if msg.req_id in self.held:
                self.held.discard(msg.req_id)
            elif msg.req_id not in self.abort_freed:
                raise Violation(f"Release of {msg.req_id}: not held (a second release)")
            else:
                self.abort_freed.discard(msg.req_id)  # the Abort-then-Release race: a no-op, once
        return []

    def step(self, wid: int) -> list:
        if not self.plans:
            return []
        plan, finished = self.plans.popleft(), []
        for p in plan.pieces:
            if p.is_last and p.req_id in self.live and p.req_id not in self.held:
                prior = self.live[p.req_id]
                n = 1 if p.new is None else p.new.params.n
                done = "length" if prior + 1 >= self.max_tokens[p.req_id] else None
                self.held.add(p.req_id)
                finished.append(PrefillResult(req_id=p.req_id, block_ids=[1], num_prompt_tokens=1,
                                              first_tokens=[prior] * n, finish_reasons=[done] * n))
        return [ChunkDone(worker_id=wid, chunk_id=plan.chunk_id, finished=finished)]


class DecodeSide:
    def __init__(self) -> None:
        self.waiting: dict[str, Handoff] = {}
        self.running: dict[str, dict[int, int]] = {}  # req -> choice -> next token position
        self.max_tokens: dict[str, int] = {}

    def handle(self, wid: int, msg) -> list:
        if isinstance(msg, Handoff):
            self.waiting[msg.req_id] = msg
        elif isinstance(msg, Abort):
            if msg.choice is None:
                self.waiting.pop(msg.req_id, None)
                self.running.pop(msg.req_id, None)
                return [Dropped(worker_id=wid, req_id=msg.req_id)]
            self.running.get(msg.req_id, {}).pop(msg.choice, None)
        return []

    def admit(self, wid: int) -> list:
        if not self.waiting:
            return []
        req_id = next(iter(self.waiting))
        h = self.waiting.pop(req_id)
        self.running[req_id] = {c: h.prior_output_tokens + 1 for c in h.open_choices}
        self.max_tokens[req_id] = h.params.max_tokens
        return [KVCopied(worker_id=wid, req_id=req_id, num_bytes=0, seconds=0.0)]

    def step(self, wid: int) -> list:
        batch = TokenBatch(worker_id=wid, req_ids=[], choices=[], token_ids=[], finish_reasons=[])
        for req_id, choices in list(self.running.items()):
            for c, pos in list(choices.items()):
                done = pos + 1 >= self.max_tokens[req_id]
                batch.req_ids.append(req_id)
                batch.choices.append(c)
                batch.token_ids.append(pos)
                batch.finish_reasons.append("length" if done else None)
                choices[c] = pos + 1
                if done:
                    del choices[c]
            if not choices:
                del self.running[req_id]
        return [batch] if batch.req_ids else []


class World:
    def __init__(self, rng: random.Random) -> None:
        self.front = FrontScheduler(CFG, rng)
        self.now = 0.0
        self.dead: set[int] = set()
        self.sides = {w: PrefillSide() if r == "prefill" else DecodeSide() for w, r in ROLES.items()}
        self.to_worker = {w: deque() for w in ROLES}
        self.to_front = {w: deque() for w in ROLES}
        self.ids: list[str] = []
        self.streams: dict[str, list[int]] = {}
        self.aborted: set[str] = set()

    def loads(self) -> list[WorkerLoad]:
        return [WorkerLoad(worker_id=w, role=r, state="dead" if w in self.dead else "ready", free_blocks=64,
                           total_blocks=64, max_num_seqs=8) for w, r in ROLES.items()]

    # ---- front events, each checked -------------------------------------------------
    def event(self, call, *args):
        gone_before = {r for r in self.ids if r not in self.front.reqs}
        acts = call(*args)
        for wid, msg in acts.sends:
            ids = [p.req_id for p in msg.pieces] if isinstance(msg, ChunkPlan) else [msg.req_id]
            if any(r in gone_before for r in ids) and not isinstance(msg, Release):
                raise Violation(f"{type(msg).__name__} for gone request(s) {ids}")
            if wid not in self.dead:
                self.to_worker[wid].append(msg)
        for req_id, _ in acts.fails:
            if req_id in gone_before:
                raise Violation(f"failed gone request {req_id}")
        return acts

    def arrive(self, n: int, prompt_tokens: int, max_tokens: int) -> None:
        req_id = f"r{len(self.ids)}"
        req = FrontReq(req_id, list(range(prompt_tokens)), SamplingParams(max_tokens=max_tokens, n=n), self.now)
        try:
            self.event(self.front.add, req, self.loads(), self.now)
        except NoWorker:
            return
        self.ids.append(req_id)
        self.streams[req_id] = []

    def abort(self, k: int, choice: int | None) -> None:
        if self.ids:
            req_id = self.ids[k % len(self.ids)]
            req = self.front.reqs.get(req_id)
            if choice is not None and (req is None or choice >= req.params.n):
                choice = None
            self.event(self.front.abort, req_id, choice)
            if choice is None and req is not None:
                self.aborted.add(req_id)
                still = self.front.reqs.get(req_id)
                if still is not None and not (still.aborting and still.state is ReqState.AWAIT_DECODE):
                    raise Violation(f"aborted {req_id} still live in {still.state.name}")

    def front_reads(self, wid: int) -> None:
        if not self.to_front[wid]:
            return
        msg = self.to_front[wid].popleft()
        if isinstance(msg, ChunkDone):
            acts = self.event(self.front.on_chunk_done, msg, self.loads(), self.now)
            self.stream([(msg.finished[i].req_id, 0, msg.finished[i].first_tokens[0]) for i in acts.current])
        elif isinstance(msg, TokenBatch):
            acts = self.event(self.front.on_token_batch, msg)
            self.stream([(msg.req_ids[i], msg.choices[i], msg.token_ids[i]) for i in acts.current])
        elif isinstance(msg, KVCopied):
            self.event(self.front.on_kv_copied, msg)
        elif isinstance(msg, Dropped):
            self.event(self.front.on_dropped, msg.req_id)

    def stream(self, entries) -> None:
        for req_id, choice, token in entries:
            if choice == 0:
                if token != len(self.streams[req_id]):
                    raise Violation(f"{req_id} streamed position {token} after {self.streams[req_id]}")
                self.streams[req_id].append(token)

    def tick(self, dt: float) -> None:
        self.now += dt
        self.event(self.front.expire, self.now)
        for req in self.front.reqs.values():
            late = self.now > req.deadline_s if (req.aborting or req.state is ReqState.AWAIT_DECODE) else False
            if late or (not req.aborting and self.now - req.arrival_s > CFG.request_timeout_s):
                raise Violation(f"{req.req_id} outlived its deadline in {req.state.name}")

    def die(self, wid: int, migrate: bool) -> None:
        if wid in self.dead:
            return
        self.dead.add(wid)
        self.to_worker[wid].clear()
        self.to_front[wid].clear()  # the engine ignores what a dead worker sent
        self.sides[wid] = PrefillSide() if ROLES[wid] == "prefill" else DecodeSide()
        self.event(self.front.on_worker_dead, wid, self.loads(), migrate)

    def restart(self, wid: int) -> None:
        if wid in self.dead:
            self.dead.discard(wid)
            self.event(self.front.unpark, self.loads(), self.now)

    # ---- worker events ----------------------------------------------------------------
    def deliver(self, wid: int) -> None:
        side = self.sides[wid]
        while self.to_worker[wid]:
            msg = self.to_worker[wid].popleft()
            out = side.handle(msg) if ROLES[wid] == "prefill" else side.handle(wid, msg)
            self.to_front[wid].extend(out)

    def work(self, wid: int, admit: bool) -> None:
        if wid in self.dead:
            return
        side = self.sides[wid]
        if ROLES[wid] == "prefill":
            self.to_front[wid].extend(side.step(wid))
        else:
            self.to_front[wid].extend(side.admit(wid) if admit else side.step(wid))

    def round(self, admit: bool = True) -> None:
        """Every live worker: its messages delivered, one admission (unless the decode workers'
        admission policy refuses all this round) and one step; the front reads all."""
        for wid in ROLES:
            self.deliver(wid)
            if admit:
                self.work(wid, admit=True)
            self.work(wid, admit=False)
            while self.to_front[wid]:
                self.front_reads(wid)

    def drain(self) -> None:
        for wid in list(self.dead):
            self.restart(wid)
        for _ in range(400):
            self.round()
            idle = not any(self.to_worker.values()) and not any(self.to_front.values())
            if idle and not self.front.reqs:
                return
        raise Violation(f"never drained: {sorted(self.front.reqs)}")

    def check_end(self) -> None:
        for wid, side in self.sides.items():
            if isinstance(side, PrefillSide) and side.held:
                raise Violation(f"worker {wid} still holds {sorted(side.held)} (never Released)")
            if isinstance(side, DecodeSide) and (side.waiting or side.running):
                raise Violation(f"worker {wid} still holds {sorted(side.waiting) + sorted(side.running)}")


WID = st.sampled_from(sorted(ROLES))
EVENT = st.one_of(
    st.tuples(st.just("arrive"), st.sampled_from([1, 1, 2]), st.integers(1, 20), st.integers(1, 4)),
    st.tuples(st.just("deliver"), WID),
    st.tuples(st.just("work"), WID, st.booleans()),
    st.tuples(st.just("front"), WID),
    st.tuples(st.just("abort"), st.integers(0, 30), st.sampled_from([None, None, 0, 1])),
    st.tuples(st.just("die"), WID, st.booleans()),
    st.tuples(st.just("restart"), WID),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 3.0, 12.0])),
    st.tuples(st.just("round"), st.booleans()),
    st.tuples(st.just("round"), st.booleans()),  # twice as likely: a round moves every request on
)


def run_events(events, seed: int = 0) -> World:
    world = World(random.Random(seed))
    for ev in events:
        kind, *args = ev
        getattr(world, {"front": "front_reads"}.get(kind, kind))(*args)
    world.drain()
    world.check_end()
    return world


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENT, min_size=20, max_size=80), st.integers(0, 3))
def test_random_event_sequences_keep_the_handoff_invariants(events, seed):
    run_events(events, seed)


def test_abort_while_the_copy_is_in_flight_releases_once_dropped_comes():
    """The documented path, by hand: AWAIT_DECODE abort waits for Dropped, then Releases."""
    world = World(random.Random(0))
    world.arrive(1, 4, 3)
    world.deliver(0)
    world.work(0, admit=False)
    world.front_reads(0)  # the prefill result: Handoff ordered to a decode worker
    req = world.front.reqs["r0"]
    assert req.state is ReqState.AWAIT_DECODE and world.sides[0].held == {"r0"}
    world.abort(0, None)
    assert world.front.reqs["r0"].aborting and world.sides[0].held == {"r0"}
    did = req.decode_worker
    world.deliver(did)  # Handoff, then Abort: Dropped comes back
    world.front_reads(did)
    assert "r0" not in world.front.reqs
    world.deliver(0)
    assert world.sides[0].held == set()


def test_only_the_holders_tokens_are_current():
    """TokenBatch entries from a worker that does not hold the request are left out of
    `current` and not recorded; the holder's are, in order."""
    world = World(random.Random(0))
    world.arrive(1, 4, 5)
    world.deliver(0)
    world.work(0, admit=False)
    world.front_reads(0)
    did = world.front.reqs["r0"].decode_worker
    other = ({2, 3} - {did}).pop()
    acts = world.front.on_token_batch(TokenBatch(worker_id=other, req_ids=["r0", "nope"], choices=[0, 0],
                                                 token_ids=[7, 8], finish_reasons=[None, None]))
    assert acts.current == [] and world.front.reqs["r0"].output_ids == [0]  # the first token only
    acts = world.front.on_token_batch(TokenBatch(worker_id=did, req_ids=["nope", "r0", "r0"], choices=[0, 0, 0],
                                                 token_ids=[9, 1, 2], finish_reasons=[None, None, None]))
    assert acts.current == [1, 2] and world.front.reqs["r0"].output_ids == [0, 1, 2]
