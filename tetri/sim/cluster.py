"""The cluster level: workers by mode, both dispatch decisions, the predictor, and flips.

Every decision is made by the real policy objects of `tetri.sched` from `WorkerLoad` rows
built from the workers' state at that instant (one node, shared memory: no staleness, as
in tetri-serve's front scheduler):
  arrival -> level 1 `make_prefill_dispatch(prefill_dispatch)` over prefill/mixed workers;
  last prefill piece done -> the length predictor annotates the request, then level 2
  `make_decode_dispatch(decode_dispatch)` over decode workers, and the handoff is queued
  in that worker's admission.
With `flip`, a monitor tick every `flip_interval_s` asks the real `FlipPolicy` and drives
the real `FlipPlan` drain protocol; a drained worker changes role after `flip_latency_s`.
Mode `auto` always has the monitor, asking the adaptive `RolePolicy` (prefill / mixed /
decode, `tetri.sched.roles`) instead; a flip to mixed happens in place (no drain). A mixed
worker keeps the requests it prefilled (`PDWorker.adopt`) unless `keeps_its_decode` says
level-2 dispatch found a much emptier worker (then it hands off like a prefill worker).
"""

from __future__ import annotations

import random

from tetri.sched.dispatch import make_decode_dispatch, make_prefill_dispatch
from tetri.sched.flip import FlipPlan, FlipPolicy
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.load import WorkerLoad
from tetri.sched.prefix_index import PrefixIndex
from tetri.sched.roles import RolePolicy, keeps_its_decode
from tetri.sim.colocated import ChunkedWorker, ColocatedWorker
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import CostModel
from tetri.sim.disagg import PDWorker
from tetri.sim.requests import NoisyPredictor, SimRequest
from tetri.sim.workers import EventLoop, SimWorker, WorkerEnv


def build_env(cfg: SimConfig, cost: CostModel, loop: EventLoop, hooks) -> WorkerEnv:
    num_blocks = cfg.num_blocks or cost.kv_capacity_blocks(cfg.block_size)
    return WorkerEnv(loop=loop, cost=cost, hooks=hooks, num_blocks=num_blocks, block_size=cfg.block_size,
                     max_num_seqs=cfg.max_num_seqs, chunk_size_tokens=cfg.chunk_size_tokens,
                     prefill_chunk_tokens=cfg.prefill_chunk_tokens,
                     max_batched_tokens=cfg.max_batched_tokens, prefill_policy=cfg.prefill_policy,
                     sched_batch=cfg.sched_batch, decode_policy=cfg.decode_policy,
                     heavy_decode_tokens=cfg.heavy_decode_tokens, check_invariants=cfg.check_invariants,
                     prefix_caching=cfg.prefix_caching,
                     host_blocks=cost.host_blocks(cfg.kv_offloading_size, cfg.block_size) if cfg.prefix_caching else 0,
                     swap_blocks=cost.host_blocks(cfg.swap_space, cfg.block_size), preemption_mode=cfg.preemption_mode)


def build_workers(cfg: SimConfig, env: WorkerEnv) -> list[SimWorker]:
    if cfg.mode == "colocated":
        return [ColocatedWorker(i, env) for i in range(cfg.num_gpus)]
    if cfg.mode == "colocated-chunked":
        return [ChunkedWorker(i, env) for i in range(cfg.num_gpus)]
    whole = cfg.mode == "disagg"
    prefill, decode = cfg.split()
    if cfg.mode == "auto":  # prefill first, then mixed, decode last
        mixed = cfg.num_gpus - prefill - decode
        roles = ["prefill"] * prefill + ["mixed"] * mixed + ["decode"] * decode
        return [PDWorker(i, env, role, False) for i, role in enumerate(roles)]
    return [PDWorker(i, env, "prefill" if i < prefill else "decode", whole) for i in range(prefill + decode)]


class FlipControl:
    """Periodic flip decisions (real FlipPolicy) and the drain protocol (real FlipPlan)."""

    def __init__(self, cluster: Cluster, cfg: SimConfig) -> None:
        self.cluster = cluster
        self.cfg = cfg
        busy_tokens = 4 * cfg.chunk_size_tokens
        if cfg.mode == "auto":  # the same pure policy tetri-serve's --mode auto asks
            chunk = cfg.chunk_size_tokens
            busy_tokens = max(1, int(cfg.role_busy_s * chunk / cluster.cost.prefill_s([chunk])))
            self.policy = RolePolicy(busy_tokens, cfg.role_high, cfg.role_room, cfg.role_dwell_s,
                                     cfg.role_worker_dwell_s, cfg.role_tpot_s)
        else:
            self.policy = FlipPolicy(window_s=cfg.flip_window_s, prefill_busy_tokens=busy_tokens)
        self.plan = FlipPlan({w.worker_id: w.role for w in cluster.workers}, in_place_to_mixed=cfg.mode == "auto")
        self.flips: list[tuple[float, int, str]] = []
        self.decisions: list[dict] = []
        """Every decision the plan accepted: time, worker, from, to, reason."""

    def start(self) -> None:
        self.cluster.loop.at(self.cfg.flip_interval_s, self.tick)

    def tick(self) -> None:
        loop = self.cluster.loop
        if self.cluster.pending == 0 and loop.idle:
            return  # nothing left to arrive or run
        loads = self.plan.view([w.load() for w in self.cluster.workers])
        decision = self.policy.decide(loads, loop.now)
        if decision is not None and self.plan.begin(decision):
            self.decisions.append({"t_s": round(loop.now, 3), "worker": decision.worker_id,
                                   "from": decision.from_role, "to": decision.to_role, "reason": decision.reason})
        for order in self.plan.poll(loads):
            worker = self.cluster.workers[order.worker_id]
            worker.paused = True
            loop.at(loop.now + self.cfg.flip_latency_s, self._flipped, worker, order.to_role)
        loop.at(loop.now + self.cfg.flip_interval_s, self.tick)

    def _flipped(self, worker: SimWorker, role: str) -> None:
        worker.role = role
        worker.paused = False
        worker.blocks.clear_cache()  # as the real worker: its cache goes with its old role
        worker.blocks.take_evicted()
        self.cluster.prefix_index.forget(worker.worker_id)
        self.plan.on_flipped(worker.worker_id)
        self.flips.append((self.cluster.loop.now, worker.worker_id, role))
        worker.kick()


class Cluster:
    def __init__(self, cfg: SimConfig, cost: CostModel, loop: EventLoop, rng: random.Random) -> None:
        self.cfg = cfg
        self.cost = cost
        self.loop = loop
        self.env = build_env(cfg, cost, loop, self)
        self.workers = build_workers(cfg, self.env)
        self.prefix_index = PrefixIndex()
        """What the front believes each prefill worker caches (trace ids), as in tetri-serve."""
        self.prefill_dispatch = make_prefill_dispatch(cfg.prefill_dispatch, rng, self.prefix_index)
        self.decode_dispatch = None
        if cfg.decode_dispatch is not None and cfg.mode in ("disagg", "tetri", "auto"):
            self.decode_dispatch = make_decode_dispatch(cfg.decode_dispatch, rng, cfg.heavy_decode_tokens)
        self.predictor = NoisyPredictor(cfg.predictor or "none", rng, cfg.predictor_accuracy, cfg.bucket_tokens,
                                        cfg.predictor_confusion)
        self.flip = FlipControl(self, cfg) if (cfg.flip and cfg.mode in ("disagg", "tetri")) or cfg.mode == "auto" \
            else None
        self.pending = 0
        self.on_finish = None
        """Optional callback(req) when a request finishes (the simulator's early stop)."""

    def start(self) -> None:
        if self.flip is not None:
            self.flip.start()

    def loads(self) -> list[WorkerLoad]:
        rows = [w.load() for w in self.workers]
        return self.flip.plan.view(rows) if self.flip is not None else rows

    def _dispatched(self, req: SimRequest, worker_id: int) -> None:
        if self.flip is not None:
            self.flip.plan.on_dispatch(req.req_id, worker_id)

    def _done(self, req: SimRequest, worker_id: int | None) -> None:
        if self.flip is not None and worker_id is not None:
            self.flip.plan.on_done(req.req_id, worker_id)

    # ---- requests in ---------------------------------------------------------------
    def arrive(self, req: SimRequest) -> None:
        total = req.prompt_tokens + req.output_tokens
        if total > self.cost.model.max_model_len:
            req.error = f"prompt + output ({total}) exceeds max_model_len {self.cost.model.max_model_len}"
            return
        if blocks_for_tokens(total, self.env.block_size) > self.env.num_blocks:
            req.error = f"prompt + output ({total} tokens) does not fit one worker's KV cache"
            return
        self.pending += 1
        worker_id = self.prefill_dispatch.pick(self.loads(), req.info)
        req.prefill_worker = worker_id
        self._dispatched(req, worker_id)
        self.workers[worker_id].add(req)

    # ---- hooks from workers ------------------------------------------------------------
    def evicted(self, worker: SimWorker, keys: list) -> None:
        """A prefill worker's eviction report: a trace block with any sub-block gone is gone."""
        self.prefix_index.evicted(worker.worker_id, list({h for h, _ in keys}))

    def prefilled(self, req: SimRequest, worker: SimWorker) -> None:
        """The first token is out; predict the length and hand off to a decode worker."""
        if req.info.prefix_hashes:
            self.prefix_index.add(worker.worker_id, list(req.info.prefix_hashes))
        req.info = self.predictor.annotate(req.info, req.output_tokens)
        loads = self.loads()
        worker_id = self.decode_dispatch.pick(loads, req.info)
        if worker.role == "mixed" and keeps_its_decode(next(w for w in loads if w.worker_id == worker.worker_id),
                                                       next(w for w in loads if w.worker_id == worker_id)):
            req.decode_worker = worker.worker_id  # it decodes what it prefilled (still outstanding there)
            worker.adopt(req)
            return
        req.decode_worker = worker_id
        self._dispatched(req, worker_id)
        self.workers[worker_id].handoff(req)

    def released(self, req: SimRequest, worker: SimWorker) -> None:
        """The decode side copied the KV: the prefill worker frees its blocks."""
        prefill = self.workers[req.prefill_worker]
        prefill.release(req)
        self._done(req, req.prefill_worker)

    def finished(self, req: SimRequest, worker: SimWorker) -> None:
        self.pending -= 1
        self._done(req, worker.worker_id)
        if self.on_finish is not None:
            self.on_finish(req)
