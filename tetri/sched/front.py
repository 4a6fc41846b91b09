"""The front scheduler: the cluster level of the two-level scheduler, pure code.

It packs each prefill worker's queue into fixed-size chunks (keeping one queued ahead of
the one running), makes both dispatch decisions from load-board snapshots, and keeps the
prefix indexes. Every request's handoff state lives in its `Lifecycle`
(`tetri.sched.handoff`: the states, the transitions and their diagram), which the event
methods below delegate to. It performs no I/O: each method returns `Actions` (messages to
send, requests to fail, the output entries that are current) that the caller carries out.

The events (what the engine client, the in-process cluster and the simulator call):
`add`, `on_chunk_done` (or its halves `chunk_done` + `prefilled`), `on_kv_copied`,
`on_dropped`, `on_token_batch`, `abort`, `fail_request`, `on_worker_dead`, `unpark`,
`expire`, `flip_tick`. Nothing else changes a request's state.

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

from tetri.protocol import ChunkDone, ChunkPlan, KVCopied, PlanPiece, PrefillResult, SetRole, SubmitMixed, TokenBatch
from tetri.sched import front_failover
from tetri.sched.chunking import ChunkPacker
from tetri.sched.decode_affinity import PrefixAffinityDecode
from tetri.sched.dispatch import NoWorker, make_decode_dispatch, make_prefill_dispatch
from tetri.sched.flip import CAN_DECODE, FlipDecision, FlipPlan, FlipPolicy
from tetri.sched.front_types import Actions, FrontConfig, FrontReq, ReqState
from tetri.sched.handoff import HELD_BY_PREFILL, Lifecycle
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
        """--mode auto: flips to and from mixed happen in place, and mixed workers take handoffs."""
        self.role_decisions: list[tuple[float, FlipDecision]] = []
        """(when, decision) of every flip begun; the engine client reports and clears them."""
        self.prefix_index = PrefixIndex()
        self.level1 = make_prefill_dispatch(cfg.global_policy, rng, self.prefix_index)
        self.decode_index = PrefixIndex()
        """Which decode worker caches which block hashes (the handoffs it took, what it decoded)."""
        level2 = make_decode_dispatch(cfg.dispatch_policy, rng, heavy_decode_tokens=cfg.heavy_decode_tokens)
        self.level2 = PrefixAffinityDecode(level2, self.decode_index) if cfg.prefix_caching else level2
        self.life = Lifecycle(self)
        """Every request's handoff state; changed only by its transitions."""
        self.packers: dict[int, ChunkPacker] = {}
        self.outstanding: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        """Per prefill worker: the tokens of the ChunkPlans sent to it whose ChunkDone has not
        come (the `_view`'s queue, with the packer's; the board row lags behind them)."""
        self._sent_plans: dict[int, tuple[int, int]] = {}
        """chunk_id -> (worker, its tokens) of every plan sent and not yet done."""
        self._chunk_ids = 0

    def _packer(self, wid: int) -> ChunkPacker:
        if wid not in self.packers:
            self.packers[wid] = ChunkPacker(self.cfg.chunk_size, self.cfg.prefill_policy, self.cfg.prefill_sched_batch,
                                            self.cfg.whole_prompts)
            self.outstanding[wid] = 0
            self.sent_tokens[wid] = 0
        return self.packers[wid]

    def _view(self, loads: list[WorkerLoad]) -> list[WorkerLoad]:
        """Board rows with what the front knows better than they do; draining workers shown as
        such while a flip is under way. A prefill worker's queue is exactly what the front gave
        it, so its row's queue is the front's own account: the tokens in our packer, in the
        plans sent and not done (`sent_tokens`), and the requests placed there that hold or will
        hold its blocks (not yet prefilled: running; prefilled, awaiting the decode side's
        copy: waiting). The row lags: the worker shell writes it after its step, so the plans
        that came during a step (or that a step took at once) are missing from it, and level 1
        read from it alone sent a burst's prompts to the worker just given plans (docs/
        architecture.md, "Level 1 and the board"). Another role's row, and a prefill row while
        the worker still decodes (flipped in place out of mixed), adds our packer's tokens (a
        worker flipped in place to mixed still runs the plans sent before)."""
        if self.flip_policy is not None:
            if self.flip_plan is None:  # adaptive: mixed workers flip too
                roles = ("prefill", "decode", "mixed") if self.adaptive else ("prefill", "decode")
                self.flip_plan = FlipPlan({w.worker_id: w.role for w in loads if w.role in roles},
                                          in_place_to_mixed=self.adaptive, in_place_out_of_mixed=self.adaptive)
            loads = self.flip_plan.view(loads)
        held = self._prefill_held() if any(w.role == "prefill" for w in loads) else {}
        view = []
        for w in loads:
            counts = held.get(w.worker_id, (0, 0, 0))
            if w.role == "prefill" and not counts[2]:  # it decodes nothing: the front's account is its queue
                w = self._own_prefill_row(w, counts)
            elif w.worker_id in self.packers:
                w = replace(w, queued_prefill_tokens=w.queued_prefill_tokens + self.packers[w.worker_id].queued_tokens)
            view.append(w)
        return view

    def _own_prefill_row(self, w: WorkerLoad, held: tuple[int, int, int]) -> WorkerLoad:
        queued = self.sent_tokens.get(w.worker_id, 0)
        if w.worker_id in self.packers:
            queued += self.packers[w.worker_id].queued_tokens
        return replace(w, queued_prefill_tokens=queued, running_reqs=held[0], waiting_reqs=held[1])

    def _prefill_held(self) -> dict[int, tuple[int, int, int]]:
        """Per worker: (requests placed there for prefill not yet prefilled, prefilled ones
        whose blocks it holds for the handoff, requests it decodes). A prefill worker that still
        decodes (flipped in place out of mixed: its old core's prompts and decodes run on)
        holds work the front did not count in plans: its row, plus our packer, stands for it."""
        held: dict[int, list[int]] = {}
        for req in self.reqs.values():
            if req.decode_worker is not None and req.state in (ReqState.AWAIT_DECODE, ReqState.DECODING):
                held.setdefault(req.decode_worker, [0, 0, 0])[2] += 1
            if req.prefill_worker is not None and req.state in HELD_BY_PREFILL:
                counts = held.setdefault(req.prefill_worker, [0, 0, 0])
                counts[req.state is ReqState.AWAIT_DECODE] += 1
        return {wid: (c[0], c[1], c[2]) for wid, c in held.items()}

    # ---- the lifecycle's state, read-only views -------------------------------------
    @property
    def reqs(self) -> dict[str, FrontReq]:
        """The live requests by id (read it; `Lifecycle` changes it)."""
        return self.life.reqs

    @property
    def parked(self) -> list[str]:
        """Migrated requests waiting for a live worker of the role (a restart); deadline-bound."""
        return self.life.parked

    @property
    def parked_handoffs(self) -> dict[str, tuple[FrontReq, int, PrefillResult, ReqInfo]]:
        return self.life.parked_handoffs

    @property
    def migrated_total(self) -> int:
        return self.life.migrated_total

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
        self.life.placed(req, wid, mixed=role == "mixed")
        acts = Actions()
        if role == "mixed":
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
                new = None if req.first_sent else self.life.first_piece_sent(req)
                pieces.append(PlanPiece(req_id=piece.req_id, start=piece.start, num_tokens=piece.num_tokens,
                                        is_last=piece.is_last, new=new))
            self._chunk_ids += 1
            self.outstanding[wid] += 1
            tokens = sum(p.num_tokens for p in pieces)
            self.sent_tokens[wid] += tokens
            self._sent_plans[self._chunk_ids] = (wid, tokens)
            acts.send(wid, ChunkPlan(chunk_id=self._chunk_ids, pieces=pieces))
        return acts

    # ---- worker events -----------------------------------------------------------------
    def on_chunk_done(self, msg: ChunkDone, loads: list[WorkerLoad], now: float) -> Actions:
        acts = self.chunk_done(msg)
        for res in msg.finished:
            acts.extend(self.prefilled(res, msg.worker_id, loads, now))
        return acts

    def chunk_done(self, msg: ChunkDone) -> Actions:
        """The first tokens and the chunk-pipeline half of a ChunkDone: `current` lists the
        indices into `msg.finished` from the worker that holds the request (their first token
        recorded: stream exactly these); one chunk fewer outstanding (unless only a part of it
        ran), and the next chunks packed. `prefilled` then handles each result."""
        wid = msg.worker_id
        acts = self.life.first_tokens(msg)
        self.prefix_index.evicted(wid, msg.evicted_hashes)
        if msg.partial:  # (its tokens count until the rest of the plan ran: the worker is short of blocks)
            return acts
        sent = self._sent_plans.pop(msg.chunk_id, None)
        if sent is not None and sent[0] in self.sent_tokens:
            self.sent_tokens[sent[0]] = max(0, self.sent_tokens[sent[0]] - sent[1])
        if wid in self.outstanding:
            self.outstanding[wid] = max(0, self.outstanding[wid] - 1)
        return self._pump(wid, acts)

    def forget_plans(self, wid: int) -> None:
        """`wid` died or flipped after draining: its packer and the plans sent to it are gone."""
        self.packers.pop(wid, None)
        self.outstanding.pop(wid, None)
        self.sent_tokens.pop(wid, None)
        for chunk_id in [c for c, (w, _) in self._sent_plans.items() if w == wid]:
            del self._sent_plans[chunk_id]

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
        req, acts = self.life.prefilled(res, wid)
        if req is None:
            return acts
        view = self._view(loads)
        predicted_info = self._predict(req, res, prediction, predicted)
        try:
            did = self.level2.pick(self._handoff_targets(view, wid),  # flip section: mixed too in auto
                                   self._decode_prefix(req, predicted_info, wid, view))
        except NoWorker:  # no live decode worker: the prefilled KV waits for a restart, deadline-bound
            self.life.park_handoff(req, wid, res, predicted_info, now)
            return acts
        return acts.extend(self.life.hand_off(req, wid, did, res, now))

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
        self._decode_evicted(msg.worker_id, msg.evicted_hashes)  # evicted before this copy's blocks were cached
        return self.life.kv_copied(msg)

    def on_dropped(self, req_id: str) -> Actions:
        """The decode worker holds nothing of an aborted request: free the prefill copy."""
        return self.life.dropped(req_id)

    def on_token_batch(self, msg: TokenBatch) -> Actions:
        """A decode or mixed worker's step: its eviction report first (before a finish indexes
        new blocks), then `current` = the indices of the entries from the worker that holds
        the request (stream exactly these), each recorded and a finished choice closed."""
        self._decode_evicted(msg.worker_id, msg.evicted_hashes)
        return self.life.token_batch(msg)

    def _decode_evicted(self, wid: int, hashes: list[bytes]) -> None:
        """A decode or mixed worker's eviction report (on its KVCopied and TokenBatch messages)."""
        if hashes:
            self.decode_index.evicted(wid, hashes)
            self.prefix_index.evicted(wid, hashes)  # a mixed worker's entries

    # ---- aborts, deaths, deadlines -----------------------------------------------------
    def abort(self, req_id: str, choice: int | None = None) -> Actions:
        return self.life.abort(req_id, choice)

    def on_worker_dead(self, wid: int, loads: list[WorkerLoad] | None = None, migrate: bool = False) -> Actions:
        return front_failover.on_worker_dead(self, wid, loads, migrate)

    def unpark(self, loads: list[WorkerLoad], now: float) -> Actions:
        """A worker came back: place the parked requests and the parked handoffs."""
        return front_failover.unpark(self, loads, now)

    def expire(self, now: float) -> Actions:
        """Every state has a deadline: the handoff must be admitted within handoff_timeout_s,
        and no request outlives request_timeout_s."""
        return self.life.expire(now)

    def fail_request(self, req_id: str, why: str) -> Actions:
        """A worker reported an error for this request: drop it everywhere."""
        return self.life.fail_request(req_id, why)

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
            if not plan.in_place(order.from_role, order.to_role):
                # drained: every request it held is done, so our packer for it is empty
                self.forget_plans(order.worker_id)
            # (in place: the packer keeps feeding the worker's old prefill core until empty; out
            # of mixed, a new prefill role's packer is made at its first prompt)
            self.prefix_index.forget(order.worker_id)  # the worker drops its cache with its role
            self.decode_index.forget(order.worker_id)
            acts.send(order.worker_id, SetRole(role=order.to_role))
        return acts

    def _handoff_targets(self, view: list[WorkerLoad], wid: int) -> list[WorkerLoad]:
        """Level 2's candidates: decode workers; in auto mode mixed ones too (a mixed worker
        runs a decode core for handoffs, `workers/side_cores.py`), never the prefilling worker."""
        roles = CAN_DECODE if self.adaptive else ("decode",)
        return [w for w in view if w.role in roles and w.worker_id != wid]
