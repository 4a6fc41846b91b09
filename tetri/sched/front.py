"""The front scheduler: the cluster level of the two-level scheduler, pure code.

It owns every request's handoff state machine, packs each prefill worker's queue into
fixed-size chunks (keeping one queued ahead of the one running), and makes both dispatch
decisions from load-board snapshots. It performs no I/O: each method returns `Actions`
(messages to send, requests to fail) that the engine client carries out.

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
    AWAIT_DECODE past `handoff_timeout_s`, or any state past `request_timeout_s`: fails.
Colocated mode sends each request whole to a `mixed` worker (state DECODING at once).

Priority (vLLM's: lower first) orders each prefill worker's queue and rides to the workers
for decode admission.

Prefix caching: `prefix_index` estimates what each prefill worker caches (level 1 and where
a prompt's first chunk starts), `decode_index` what each decode worker caches (a prompt's
blocks once its KV landed there, the blocks it decoded once it ended, less the eviction
reports); level 2 then prefers the holder (`sched/decode_affinity.py`).
"""

from __future__ import annotations

import random
from dataclasses import replace

from tetri.protocol import (Abort, ChunkDone, ChunkPlan, Handoff, KVCopied, NewReq, PlanPiece, PrefillResult,
                            Release, SetRole, SubmitMixed)
from tetri.sched import front_failover, front_prefix
from tetri.sched.chunking import ChunkPacker
from tetri.sched.decode_affinity import PrefixAffinityDecode
from tetri.sched.dispatch import NoWorker, make_decode_dispatch, make_prefill_dispatch
from tetri.sched.flip import CAN_DECODE, FlipDecision, FlipPlan, FlipPolicy
from tetri.sched.front_types import Actions, FrontConfig, FrontReq, ReqState
from tetri.sched.load import ReqInfo, WorkerLoad
from tetri.sched.prefix_hash import block_hashes, cacheable_blocks
from tetri.sched.prefix_index import PrefixIndex
from tetri.sched.roles import RolePolicy

__all__ = ["Actions", "FrontConfig", "FrontReq", "FrontScheduler", "ReqState"]


class FrontScheduler:
    """`predictor`: a `tetri.sched.predictor.LengthPredictor` (or None), consulted when a
    prompt's prefill ends. `flip`: a `FlipPolicy` (or None); instance flips then run through
    a `FlipPlan` that tracks which worker holds which request (see `flip_tick`)."""

    def __init__(self, cfg: FrontConfig, rng: random.Random, predictor=None, flip: FlipPolicy | None = None) -> None:
        self.cfg = cfg
        self.rng = rng
        self.predictor = predictor
        self.flip_policy = flip
        self.flip_plan: FlipPlan | None = None
        self.adaptive = isinstance(flip, RolePolicy)
        """--mode auto: flips to mixed happen in place, and mixed workers take handoffs."""
        self.role_decisions: list[tuple[float, FlipDecision]] = []
        """(when, decision) of every flip begun; the engine client reports and clears them."""
        self.prefix_index = PrefixIndex()
        self.level1 = make_prefill_dispatch(cfg.global_policy, rng, self.prefix_index)
        self.decode_index = PrefixIndex()
        """Which decode worker caches which block hashes (the handoffs it took, what it decoded)."""
        level2 = make_decode_dispatch(cfg.dispatch_policy, rng, heavy_decode_tokens=cfg.heavy_decode_tokens)
        self.level2 = PrefixAffinityDecode(level2, self.decode_index) if cfg.prefix_caching else level2
        self.reqs: dict[str, FrontReq] = {}
        self.parked: list[str] = []
        """Migrated requests waiting for a live worker of the role (a restart); deadline-bound."""
        self.parked_handoffs: dict[str, tuple[FrontReq, int, PrefillResult, ReqInfo]] = {}
        self.migrated_total = 0
        self.packers: dict[int, ChunkPacker] = {}
        self.outstanding: dict[int, int] = {}
        self._chunk_ids = 0

    def _packer(self, wid: int) -> ChunkPacker:
        if wid not in self.packers:
            self.packers[wid] = ChunkPacker(self.cfg.chunk_size, self.cfg.prefill_policy, self.cfg.prefill_sched_batch)
            self.outstanding[wid] = 0
        return self.packers[wid]

    def _view(self, loads: list[WorkerLoad]) -> list[WorkerLoad]:
        """Board rows plus the tokens still waiting in our own packers; draining workers
        shown as such while a flip is under way."""
        if self.flip_policy is not None:
            if self.flip_plan is None:  # adaptive: mixed workers flip too
                roles = ("prefill", "decode", "mixed") if self.adaptive else ("prefill", "decode")
                self.flip_plan = FlipPlan({w.worker_id: w.role for w in loads if w.role in roles},
                                          in_place_to_mixed=self.adaptive)
            loads = self.flip_plan.view(loads)
        return [replace(w, queued_prefill_tokens=w.queued_prefill_tokens + self.packers[w.worker_id].queued_tokens)
                if w.worker_id in self.packers else w for w in loads]

    def _owned(self, req: FrontReq, wid: int) -> None:
        if self.flip_plan is not None and wid in self.flip_plan._workers:
            self.flip_plan.on_dispatch(req.req_id, wid)

    def _released(self, req_id: str, wid: int | None) -> None:
        if self.flip_plan is not None and wid is not None:
            self.flip_plan.on_done(req_id, wid)

    def _drop(self, req_id: str) -> FrontReq | None:
        req = self.reqs.pop(req_id, None)
        self.parked_handoffs.pop(req_id, None)
        if req is not None:
            self._released(req_id, req.prefill_worker)
            self._released(req_id, req.decode_worker)
        return req

    # ---- arrivals ----------------------------------------------------------------------
    def add(self, req: FrontReq, loads: list[WorkerLoad], now: float) -> Actions:
        """Place a new request; raises NoWorker when no live worker can take it."""
        context = req.context_ids
        req.block_hashes = None  # (re)placed: hash what the workers will prefill now
        view = self._view(loads)
        info = ReqInfo(req.req_id, len(context), req.params.max_tokens, arrival_s=req.arrival_s, priority=req.priority,
                       **self._prefix_fields(req, view))
        wid = self.level1.pick(view, info)
        role = next(w.role for w in view if w.worker_id == wid)
        req.open_choices = set(range(req.params.n))
        req.prefill_worker = wid
        self.reqs[req.req_id] = req
        self._owned(req, wid)
        acts = Actions()
        if role == "mixed":
            req.state, req.decode_worker = ReqState.DECODING, wid
            acts.send(wid, SubmitMixed(req_id=req.req_id, prompt_token_ids=context, params=req.params,
                                       arrival_s=req.arrival_s, priority=req.priority,
                                       prior_output_tokens=req.resume_tokens))
            return acts
        block_size = next(w.block_size for w in view if w.worker_id == wid)
        self._packer(wid).add(req.req_id, len(context), self._cached_start(req, wid, block_size),
                              priority=req.priority)
        return self._pump(wid, acts)

    def _prefix_fields(self, req: FrontReq, view: list[WorkerLoad]) -> dict:
        """What cache-aware dispatch reads: the prompt's cacheable block hashes."""
        bs = next((w.block_size for w in view if w.role in ("prefill", "mixed")), 0)
        if not self.cfg.prefix_caching or not bs or req.params.prompt_logprobs is not None:
            return {}
        hashes = self._hashes(req, bs)[:cacheable_blocks(len(req.context_ids), bs)]
        return dict(prefix_hashes=tuple(hashes), prefix_block_tokens=bs)

    def _hashes(self, req: FrontReq, block_size: int) -> list[bytes]:
        if req.block_hashes is None:
            req.block_hashes = block_hashes(req.context_ids, block_size, self.cfg.prefix_hash_seed)
            req.hash_block_tokens = block_size
        return req.block_hashes

    def _decode_prefix(self, req: FrontReq, info: ReqInfo, wid: int, view: list[WorkerLoad]) -> ReqInfo:
        """Level 2 reads every full block of the context (a decode worker computes nothing, so
        even the last full block may come from its cache)."""
        if not self.cfg.prefix_caching:
            return info
        bs = next(w.block_size for w in view if w.worker_id == wid)
        return replace(info, prefix_hashes=tuple(self._hashes(req, bs)), prefix_block_tokens=bs)

    def _cached_start(self, req: FrontReq, wid: int, block_size: int) -> int:
        """Where the prompt's first chunk starts: after the blocks the index expects `wid` to
        hold (the worker computes any it turns out to lack), so chunks pack uncached tokens."""
        if not self.cfg.prefix_caching or req.params.prompt_logprobs is not None:
            return 0
        hashes = self._hashes(req, block_size)[:cacheable_blocks(len(req.context_ids), block_size)]
        return self.prefix_index.matched_blocks(wid, hashes) * block_size

    def _pump(self, wid: int, acts: Actions) -> Actions:
        packer = self._packer(wid)
        while self.outstanding[wid] < self.cfg.chunks_ahead and len(packer):
            pieces = []
            for piece in packer.next_chunk():
                req = self.reqs[piece.req_id]
                new = None
                if not req.first_sent:
                    new = NewReq(prompt_token_ids=req.context_ids, params=req.params, arrival_s=req.arrival_s,
                                 priority=req.priority, prior_output_tokens=req.resume_tokens)
                    req.first_sent, req.state = True, ReqState.PREFILLING
                pieces.append(PlanPiece(req_id=piece.req_id, start=piece.start, num_tokens=piece.num_tokens,
                                        is_last=piece.is_last, new=new))
            self._chunk_ids += 1
            self.outstanding[wid] += 1
            acts.send(wid, ChunkPlan(chunk_id=self._chunk_ids, pieces=pieces))
        return acts

    # ---- worker events -----------------------------------------------------------------
    def on_chunk_done(self, msg: ChunkDone, loads: list[WorkerLoad], now: float) -> Actions:
        acts = self.chunk_done(msg)
        for res in msg.finished:
            acts.extend(self.prefilled(res, msg.worker_id, loads, now))
        return acts

    def chunk_done(self, msg: ChunkDone) -> Actions:
        """The chunk-pipeline half of a ChunkDone: one chunk fewer outstanding (unless only a
        part of it ran), and the next chunks packed. `prefilled` handles each result."""
        wid = msg.worker_id
        self.prefix_index.evicted(wid, msg.evicted_hashes)
        if msg.partial:
            return Actions()
        if wid in self.outstanding:
            self.outstanding[wid] = max(0, self.outstanding[wid] - 1)
        return self._pump(wid, Actions())

    def predict_inputs(self, req_id: str, res: PrefillResult) -> tuple[ReqInfo, dict] | None:
        """What the predictor reads for a prefilled request (callers that run the predictor
        elsewhere, e.g. off the event loop); None when the request is gone."""
        req = self.reqs.get(req_id)
        if req is None:
            return None
        info = ReqInfo(req.req_id, len(req.context_ids), req.params.max_tokens, arrival_s=req.arrival_s,
                       priority=req.priority)
        return info, {"expected_output_tokens": req.expected_output_tokens, "hidden": res.hidden,
                      "prompt": req.prompt_text}

    def prefilled(self, res: PrefillResult, wid: int, loads: list[WorkerLoad], now: float,
                  prediction=None, predicted: bool = False) -> Actions:
        """A prompt's prefill ended on `wid`: order its handoff (or release it). With
        `predicted`, `prediction` is the predictor's answer computed by the caller."""
        acts = Actions()
        self._prefilled(res, wid, loads, now, acts, prediction, predicted)
        return acts

    def _prefilled(self, res: PrefillResult, wid: int, loads, now: float, acts: Actions,
                   prediction=None, predicted: bool = False) -> None:
        req = self.reqs.get(res.req_id)
        if req is None:  # aborted while its last chunk ran
            acts.send(wid, Release(req_id=res.req_id))
            return
        req.holds_prefill_blocks = True
        if self.cfg.prefix_caching and req.block_hashes is not None:
            self.prefix_index.add(wid, req.block_hashes)  # its full blocks are cached there now
        for choice, reason in enumerate(res.finish_reasons):
            if reason is not None:
                req.open_choices.discard(choice)
        if not req.open_choices:  # done after one token: nothing to hand off
            acts.send(wid, Release(req_id=req.req_id))
            self._drop(req.req_id)
            return
        view = self._view(loads)
        predicted_info = self._predict(req, res, prediction, predicted)
        try:
            did = self.level2.pick(self._handoff_targets(view, wid),  # flip section: mixed too in auto
                                   self._decode_prefix(req, predicted_info, wid, view))
        except NoWorker:  # no live decode worker: the prefilled KV waits for a restart, deadline-bound
            front_failover.park_handoff(self, req, wid, res, predicted_info, now)
            return
        self._hand_off(req, wid, did, res, now, acts)

    def _hand_off(self, req: FrontReq, wid: int, did: int, res: PrefillResult, now: float, acts: Actions) -> None:
        req.state, req.decode_worker = ReqState.AWAIT_DECODE, did
        self._owned(req, did)
        req.deadline_s = now + self.cfg.handoff_timeout_s
        acts.send(did, Handoff(req_id=req.req_id, src_worker=wid, block_ids=res.block_ids,
                               prompt_token_ids=req.context_ids, params=req.params,
                               first_tokens=res.first_tokens, open_choices=sorted(req.open_choices),
                               predicted_output_tokens=req.predicted_low_tokens, arrival_s=req.arrival_s,
                               priority=req.priority, prior_output_tokens=req.resume_tokens))

    def _predict(self, req: FrontReq, res: PrefillResult, prediction=None, predicted: bool = False) -> ReqInfo:
        info, features = self.predict_inputs(req.req_id, res)
        if self.predictor is None and not predicted:
            return info
        pred = prediction if predicted else self.predictor.predict(info, features)
        if pred is None:
            return info
        req.predicted_low_tokens = min(pred.low_tokens, req.params.max_tokens)
        return ReqInfo(req.req_id, info.prompt_tokens, info.max_tokens, req.predicted_low_tokens,
                       pred.high_tokens, req.arrival_s, req.priority)

    def on_kv_copied(self, msg: KVCopied) -> Actions:
        acts = Actions()
        req = self.reqs.get(msg.req_id)
        self.decode_evicted(msg.worker_id, msg.evicted_hashes)  # evicted before this copy's blocks were cached
        if self.cfg.prefix_caching and req is not None and req.decode_worker == msg.worker_id and req.block_hashes:
            self.decode_index.add(msg.worker_id, req.block_hashes)  # its prompt's full blocks are cached there now
        if req is not None and req.state is ReqState.AWAIT_DECODE and not req.aborting:
            req.state = ReqState.DECODING
        if req is not None and req.holds_prefill_blocks:
            acts.send(req.prefill_worker, Release(req_id=req.req_id))
            req.holds_prefill_blocks = False
            self._released(req.req_id, req.prefill_worker)
        return acts

    def on_dropped(self, req_id: str) -> Actions:
        """The decode worker holds nothing of an aborted request: free the prefill copy."""
        acts = Actions()
        req = self.reqs.get(req_id)
        if req is not None and req.aborting:
            if req.holds_prefill_blocks:
                acts.send(req.prefill_worker, Release(req_id=req_id))
            self._drop(req_id)
        return acts

    def decode_evicted(self, wid: int, hashes: list[bytes]) -> None:
        """A decode or mixed worker's eviction report (on its KVCopied and TokenBatch messages)."""
        if hashes:
            self.decode_index.evicted(wid, hashes)
            self.prefix_index.evicted(wid, hashes)  # a mixed worker's entries

    def on_choice_finished(self, req_id: str, choice: int) -> None:
        req = self.reqs.get(req_id)
        if req is None:
            return
        req.open_choices.discard(choice)
        if not req.open_choices and not req.aborting:
            front_prefix.index_decoded(self, req)
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
        if req.prefill_worker is None:  # parked after a migration: nothing was sent anywhere
            self.parked = [r for r in self.parked if r != req_id]
            self._drop(req_id)
        elif req.state in (ReqState.QUEUED, ReqState.PREFILLING) and req.prefill_worker in self.packers:
            self.packers[req.prefill_worker].remove(req_id)
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

    def record_output(self, req_id: str, choice: int, token_ids: list[int]) -> None:
        req = self.reqs.get(req_id)
        if req is not None and choice == 0:
            if not req.output_ids:
                front_prefix.index_mixed_prefill(self, req)
            req.output_ids.extend(token_ids)

    def owns(self, req_id: str, worker_id: int, decoding: bool) -> bool:
        """Whether `worker_id` currently holds the request for that phase: output from a
        worker that lost it (died, or the request migrated) is stale and must be ignored."""
        req = self.reqs.get(req_id)
        if req is None:
            return False
        return req.decode_worker == worker_id if decoding else req.prefill_worker == worker_id

    def on_worker_dead(self, wid: int, loads: list[WorkerLoad] | None = None, migrate: bool = False) -> Actions:
        return front_failover.on_worker_dead(self, wid, loads, migrate)

    def unpark(self, loads: list[WorkerLoad], now: float) -> Actions:
        """A worker came back: place the parked requests and the parked handoffs."""
        return front_failover.unpark(self, loads, now)

    def expire(self, now: float) -> Actions:
        """Every state has a deadline: the handoff must be admitted within handoff_timeout_s,
        and no request outlives request_timeout_s."""
        return front_failover.expire(self, now)

    def fail_request(self, req_id: str, why: str) -> Actions:
        """A worker reported an error for this request: drop it everywhere."""
        acts = self.abort(req_id)
        acts.fails.append((req_id, why))
        return acts

    # ---- instance flip -----------------------------------------------------------------
    def flip_tick(self, loads: list[WorkerLoad], now: float) -> Actions:
        """Start a flip when the policy says so; order the role change once the draining
        worker holds nothing; resume dispatch once its board row shows the new role."""
        acts = Actions()
        if self.flip_policy is None:
            return acts
        view = self._view(loads)
        plan = self.flip_plan
        for w in loads:
            if plan.state_of(w.worker_id) == "flipped" and w.role == plan._workers[w.worker_id].to_role:
                plan.on_flipped(w.worker_id)
        decision = self.flip_policy.decide(view, now)
        if decision is not None and plan.begin(decision):
            self.role_decisions.append((now, decision))
        for order in plan.poll(loads):
            if not (plan.in_place_to_mixed and order.to_role == "mixed"):
                # drained: every request it held is done, so our packer for it is empty
                self.packers.pop(order.worker_id, None)
                self.outstanding.pop(order.worker_id, None)
            # (in place: the packer keeps feeding the worker's old prefill core until empty)
            self.prefix_index.forget(order.worker_id)  # the worker drops its cache with its role
            self.decode_index.forget(order.worker_id)
            acts.send(order.worker_id, SetRole(role=order.to_role))
        return acts

    def _handoff_targets(self, view: list[WorkerLoad], wid: int) -> list[WorkerLoad]:
        """Level 2's candidates: decode workers; in auto mode mixed ones too (a mixed worker
        runs a decode core for handoffs, `workers/side_cores.py`), never the prefilling worker."""
        roles = CAN_DECODE if self.adaptive else ("decode",)
        return [w for w in view if w.role in roles and w.worker_id != wid]
