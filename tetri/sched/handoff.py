"""The handoff state machine, pure code: every request's state at the front, changed only by
the methods of `Lifecycle`, each of which returns the `Actions` the transition calls for.

    QUEUED --first piece sent--> PREFILLING --ChunkDone(last piece)--> AWAIT_DECODE
    AWAIT_DECODE --KVCopied--> DECODING (prefill side Released) --all choices done--> gone
    abort:  QUEUED: unqueue | PREFILLING: unqueue + Abort(prefill) |
            AWAIT_DECODE: Abort(decode), Release(prefill) once decode says Dropped |
            DECODING: Abort(decode)
    death of a worker: each request it held is migrated (n = 1: re-queued for prefill as
    prompt + the tokens already emitted, under the same id, so the client's stream goes on
    with nothing duplicated or missing) or, with migrate off or n > 1, failed; blocks other
    workers held for it are Released / Aborted. The continuation keeps its sampling params
    and tells the workers how many of its prompt's last tokens are outputs already
    (`prior_output_tokens`), so max/min_tokens, penalties and seeded draws go on from the
    position the stream had reached.
    no live decode worker at the handoff: AWAIT_DECODE with no decode worker, the prefill
    copy held (`parked_handoffs`) until `unpark` finds one.
    AWAIT_DECODE past `handoff_timeout_s`, or any state past `request_timeout_s`: fails (an
    aborted AWAIT_DECODE waits for its Dropped within `handoff_timeout_s` more, then Releases).
Colocated mode sends each request whole to a `mixed` worker (state DECODING at once).

The one message a transition sends about a request already gone is `Release`: a prefill
result that arrives after its request was aborted (its worker holds the blocks) is Released.
Output from a worker that no longer holds the request (it died, or the request migrated or
was aborted) is stale: `first_tokens` and `token_batch` list in `Actions.current` only the
entries from the worker that holds it, which are all the caller may stream.

`Lifecycle` is a part of a `FrontScheduler` (`sched`): it reads the scheduler's settings,
removes aborted requests from its chunk packers, tells its flip plan who holds what and its
prefix indexes what a request's life cached (`front_prefix`); dispatch (where a request or a
handoff goes) stays in the scheduler, which calls the transitions with its choice.
"""

from __future__ import annotations

from tetri.protocol import Abort, ChunkDone, Handoff, KVCopied, NewReq, PrefillResult, Release, TokenBatch
from tetri.sched import front_prefix
from tetri.sched.front_types import Actions, FrontReq, ReqState

HELD_BY_PREFILL = (ReqState.QUEUED, ReqState.PREFILLING, ReqState.AWAIT_DECODE)
_HELD_BY_DECODE = (ReqState.AWAIT_DECODE, ReqState.DECODING)


class Lifecycle:
    def __init__(self, sched) -> None:
        self.sched = sched
        self.reqs: dict[str, FrontReq] = {}
        self.parked: list[str] = []
        """Migrated requests waiting for a live worker of the role (a restart); deadline-bound."""
        self.parked_handoffs: dict[str, tuple[FrontReq, int, PrefillResult, object]] = {}
        """Prefilled requests waiting for a live decode worker: (req, prefill worker, result, ReqInfo)."""
        self.migrated_total = 0

    # ---- who holds what (the flip plan's view) ---------------------------------------
    def _owned(self, req: FrontReq, wid: int) -> None:
        plan = self.sched.flip_plan
        if plan is not None and wid in plan._workers:
            plan.on_dispatch(req.req_id, wid)

    def _released(self, req_id: str, wid: int | None) -> None:
        if self.sched.flip_plan is not None and wid is not None:
            self.sched.flip_plan.on_done(req_id, wid)

    def _drop(self, req_id: str) -> FrontReq | None:
        req = self.reqs.pop(req_id, None)
        self.parked_handoffs.pop(req_id, None)
        if req is not None:
            self._released(req_id, req.prefill_worker)
            self._released(req_id, req.decode_worker)
        return req

    def _owns(self, req_id: str, worker_id: int, decoding: bool) -> bool:
        """Whether `worker_id` currently holds the request for that phase."""
        req = self.reqs.get(req_id)
        if req is None:
            return False
        return req.decode_worker == worker_id if decoding else req.prefill_worker == worker_id

    # ---- arrivals ----------------------------------------------------------------------
    def placed(self, req: FrontReq, wid: int, mixed: bool) -> None:
        """Dispatch put `req` on `wid`: queued for prefill there, or (a mixed worker) whole."""
        req.open_choices = set(range(req.params.n))
        req.prefill_worker = wid
        self.reqs[req.req_id] = req
        self._owned(req, wid)
        if mixed:
            req.state, req.decode_worker = ReqState.DECODING, wid

    def first_piece_sent(self, req: FrontReq) -> NewReq:
        """Its first piece goes out in a chunk: the request's data rides with it."""
        req.first_sent, req.state = True, ReqState.PREFILLING
        return NewReq(prompt_token_ids=req.context_ids, params=req.params, arrival_s=req.arrival_s,
                      priority=req.priority, prior_output_tokens=req.resume_tokens)

    # ---- worker events -----------------------------------------------------------------
    def first_tokens(self, msg: ChunkDone) -> Actions:
        """The first tokens of a ChunkDone's prefilled prompts: `current` lists the indices into
        `msg.finished` from the worker that holds the request; their first token is recorded."""
        acts = Actions()
        for i, res in enumerate(msg.finished):
            if self._owns(res.req_id, msg.worker_id, decoding=False):
                acts.current.append(i)
                self._record_output(res.req_id, 0, res.first_tokens[:1])
        return acts

    def prefilled(self, res: PrefillResult, wid: int) -> tuple[FrontReq | None, Actions]:
        """A prompt's prefill ended on `wid`, which holds its blocks now: the request, when it
        still needs a handoff (the caller picks the decode worker), and the Actions so far."""
        acts = Actions()
        req = self.reqs.get(res.req_id)
        if req is None:  # aborted while its last chunk ran
            acts.send(wid, Release(req_id=res.req_id))
            return None, acts
        req.holds_prefill_blocks = True
        if self.sched.cfg.prefix_caching and req.block_hashes is not None:
            self.sched.prefix_index.add(wid, req.block_hashes)  # its full blocks are cached there now
        for choice, reason in enumerate(res.finish_reasons):
            if reason is not None:
                req.open_choices.discard(choice)
        if not req.open_choices:  # done after one token: nothing to hand off
            acts.send(wid, Release(req_id=req.req_id))
            self._drop(req.req_id)
            return None, acts
        return req, acts

    def hand_off(self, req: FrontReq, wid: int, did: int, res: PrefillResult, now: float) -> Actions:
        """Dispatch chose decode worker `did` for a request prefilled on `wid`."""
        req.state, req.decode_worker = ReqState.AWAIT_DECODE, did
        self._owned(req, did)
        req.deadline_s = now + self.sched.cfg.handoff_timeout_s
        return Actions().send(did, Handoff(
            req_id=req.req_id, src_worker=wid, block_ids=res.block_ids, prompt_token_ids=req.context_ids,
            params=req.params, first_tokens=res.first_tokens, open_choices=sorted(req.open_choices),
            predicted_output_tokens=req.predicted_low_tokens, arrival_s=req.arrival_s, priority=req.priority,
            prior_output_tokens=req.resume_tokens))

    def park_handoff(self, req: FrontReq, wid: int, res: PrefillResult, info, now: float) -> None:
        """No live decode worker for a prefilled request: its prefill worker keeps the KV until a
        decode worker is back (`unpark`), or the handoff deadline fails it (`expire`)."""
        req.state, req.decode_worker = ReqState.AWAIT_DECODE, None
        req.deadline_s = now + self.sched.cfg.handoff_timeout_s
        self.parked_handoffs[req.req_id] = (req, wid, res, info)

    def kv_copied(self, msg: KVCopied) -> Actions:
        acts = Actions()
        req = self.reqs.get(msg.req_id)
        if self.sched.cfg.prefix_caching and req is not None and req.decode_worker == msg.worker_id and req.block_hashes:
            self.sched.decode_index.add(msg.worker_id, req.block_hashes)  # its prompt's full blocks are cached there
        if req is not None and req.state is ReqState.AWAIT_DECODE and not req.aborting:
            req.state = ReqState.DECODING
        if req is not None and req.holds_prefill_blocks:
            acts.send(req.prefill_worker, Release(req_id=req.req_id))
            req.holds_prefill_blocks = False
            self._released(req.req_id, req.prefill_worker)
        return acts

    def dropped(self, req_id: str) -> Actions:
        """The decode worker holds nothing of an aborted request: free the prefill copy."""
        acts = Actions()
        req = self.reqs.get(req_id)
        if req is not None and req.aborting:
            if req.holds_prefill_blocks:
                acts.send(req.prefill_worker, Release(req_id=req_id))
            self._drop(req_id)
        return acts

    def token_batch(self, msg: TokenBatch) -> Actions:
        """A decode or mixed worker's step: `current` lists the entries from the worker that
        holds the request (in order: a finish can end the request for the entries after it);
        each is recorded, and a finished choice closed."""
        acts = Actions()
        for i, req_id in enumerate(msg.req_ids):
            if not self._owns(req_id, msg.worker_id, decoding=True):
                continue  # stale: the request was aborted or migrated away from this worker
            acts.current.append(i)
            self._record_output(req_id, msg.choices[i], [msg.token_ids[i]])
            if msg.finish_reasons[i] is not None:
                self._choice_finished(req_id, msg.choices[i])
        return acts

    def _record_output(self, req_id: str, choice: int, token_ids: list[int]) -> None:
        req = self.reqs.get(req_id)
        if req is not None and choice == 0:
            if not req.output_ids:
                front_prefix.index_mixed_prefill(self.sched, req)
            req.output_ids.extend(token_ids)

    def _choice_finished(self, req_id: str, choice: int) -> None:
        req = self.reqs.get(req_id)
        if req is None:
            return
        req.open_choices.discard(choice)
        if not req.open_choices and not req.aborting:
            front_prefix.index_decoded(self.sched, req)
            self._drop(req_id)

    # ---- aborts, deaths, deadlines -----------------------------------------------------
    def abort(self, req_id: str, choice: int | None = None) -> Actions:
        acts = Actions()
        req = self.reqs.get(req_id)
        if req is None or req.aborting:
            return acts
        if choice is not None:
            req.open_choices.discard(choice)
            if req.open_choices:
                if req.state is ReqState.DECODING:
                    acts.send(req.decode_worker, Abort(req_id=req_id, choice=choice))
                return acts
        packers = self.sched.packers
        if req.prefill_worker is None:  # parked after a migration: nothing was sent anywhere
            self.parked = [r for r in self.parked if r != req_id]
            self._drop(req_id)
        elif req.state in (ReqState.QUEUED, ReqState.PREFILLING) and req.prefill_worker in packers:
            packers[req.prefill_worker].remove(req_id)
            if req.state is ReqState.PREFILLING:
                acts.send(req.prefill_worker, Abort(req_id=req_id))
            self._drop(req_id)
        elif req.state is ReqState.AWAIT_DECODE and req.decode_worker is None:  # parked: no decode worker has it
            acts.send(req.prefill_worker, Release(req_id=req_id))
            self._drop(req_id)
        elif req.state is ReqState.AWAIT_DECODE:
            req.aborting = True  # Release the prefill copy once the decode worker says Dropped
            acts.send(req.decode_worker, Abort(req_id=req_id))
        else:
            acts.send(req.decode_worker, Abort(req_id=req_id))
            self._drop(req_id)
        return acts

    def fail_request(self, req_id: str, why: str) -> Actions:
        acts = self.abort(req_id)
        acts.fails.append((req_id, why))
        return acts

    def worker_dead(self, wid: int, migrate) -> Actions:
        """Every request `wid` held: the survivors' parts let go, then migrated (`migrate(req,
        acts)` re-places it and says True) or failed."""
        acts = Actions()
        for req in list(self.reqs.values()):
            lost = (req.decode_worker == wid and req.state in _HELD_BY_DECODE) or \
                   (req.prefill_worker == wid and req.state in HELD_BY_PREFILL)
            if not lost:
                continue
            self._let_go(req, wid, acts)
            if req.aborting:  # its Dropped will never come: the prefill copy was just released
                self._drop(req.req_id)
                continue
            if req.params.n == 1 and migrate is not None and migrate(req, acts):
                continue
            phase = "decoding" if req.decode_worker == wid else "prefilling"
            self._fail(req, f"worker {wid} died while {phase} this request", acts)
        return acts

    def _let_go(self, req: FrontReq, dead: int, acts: Actions) -> None:
        """Tell the surviving holder of a request on a dead worker to drop its part."""
        if req.prefill_worker != dead and req.holds_prefill_blocks:
            acts.send(req.prefill_worker, Release(req_id=req.req_id))
        if req.decode_worker not in (None, dead):
            acts.send(req.decode_worker, Abort(req_id=req.req_id))
        packers = self.sched.packers
        if req.prefill_worker != dead and req.state is ReqState.PREFILLING and req.prefill_worker in packers:
            packers[req.prefill_worker].remove(req.req_id)
            acts.send(req.prefill_worker, Abort(req_id=req.req_id))

    def migrated(self, req: FrontReq) -> None:
        """A lost request leaves: its continuation (same id) is placed anew by the caller."""
        self._released(req.req_id, req.prefill_worker)
        self._released(req.req_id, req.decode_worker)
        self.reqs.pop(req.req_id)
        self.migrated_total += 1

    def park(self, req: FrontReq) -> None:
        """A continuation with no live worker of the role: it waits for a restart (`unpark`)."""
        req.prefill_worker = None
        self.reqs[req.req_id] = req
        self.parked.append(req.req_id)

    def take_parked(self) -> list[FrontReq]:
        """The parked continuations, unparked for placing again (`park` the ones that still wait)."""
        waiting, self.parked = self.parked, []
        return [req for req in (self.reqs.pop(r, None) for r in waiting) if req is not None]

    def take_parked_handoff(self, req_id: str) -> tuple[FrontReq, int, PrefillResult, object] | None:
        """A parked handoff, unless it is gone or moved on (a migration) since it parked."""
        req, wid, res, info = entry = self.parked_handoffs[req_id]
        if self.reqs.get(req_id) is not req or req.aborting or req.prefill_worker != wid:
            self.parked_handoffs.pop(req_id)
            return None
        return entry

    def _fail(self, req: FrontReq, why: str, acts: Actions) -> None:
        self._drop(req.req_id)
        self.parked = [r for r in self.parked if r != req.req_id]
        if not req.aborting:
            acts.fails.append((req.req_id, why))

    def expire(self, now: float) -> Actions:
        """Every state has a deadline: the handoff must be admitted within handoff_timeout_s,
        and no request outlives request_timeout_s."""
        acts, cfg = Actions(), self.sched.cfg
        for req in list(self.reqs.values()):
            if req.aborting:
                if now > req.deadline_s:  # the decode worker never confirmed the drop
                    if req.holds_prefill_blocks:
                        acts.send(req.prefill_worker, Release(req_id=req.req_id))
                    self._drop(req.req_id)
                continue
            if req.state is ReqState.AWAIT_DECODE and now > req.deadline_s:
                what = "no live decode worker" if req.decode_worker is None else "KV handoff not admitted"
                acts.extend(self.abort(req.req_id))
                acts.fails.append((req.req_id, f"{what} within {cfg.handoff_timeout_s:.0f} s"))
                if req.aborting:  # the wait for its Dropped gets a deadline of its own (this one has passed)
                    req.deadline_s = now + cfg.handoff_timeout_s
            elif now - req.arrival_s > cfg.request_timeout_s:
                acts.extend(self.abort(req.req_id))
                acts.fails.append((req.req_id, f"request exceeded its {cfg.request_timeout_s:.0f} s deadline"))
        return acts
