"""The cluster level: the simulated workers by mode, wired to the real front scheduler.

Nothing of the request lifecycle is coded here: `tetri.sim.front_adapter.SimFront` drives
the real `FrontScheduler` (both dispatch levels, chunk packing with `chunks_ahead` plans
queued per prefill worker, the handoff state machine, the length predictor, flips) and
delivers its messages to the workers, which answer with the real protocol messages:

    mode        workers                          what the front sends them
    tetri       prefill + decode (`PDWorker`)    ChunkPlan (fixed chunks), Handoff, Release
    disagg      prefill + decode (`PDWorker`)    ChunkPlan (whole prompts up to chunk_size), ...
    colocated   `ColocatedWorker` (vLLM 0.2)     SubmitMixed
    colocated-chunked  `ChunkedWorker` (Sarathi) SubmitMixed
    auto        `PDWorker`s, prefill / mixed / decode, moved by the real `RolePolicy`
                through `front.flip_tick` (a flip to mixed in place, the others drained);
                a mixed worker gets SubmitMixed and, from prefill workers, Handoffs

With `flip` (disagg, tetri) the monitor asks the real `FlipPolicy` the same way. A `SetRole`
pauses the worker for `flip_latency_s`; it then takes the role and drops its prefix cache.
"""

from __future__ import annotations

import random

from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.load import WorkerLoad
from tetri.sim.colocated import ChunkedWorker, ColocatedWorker
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import CostModel
from tetri.sim.disagg import PDWorker
from tetri.sim.front_adapter import SimFront, SimTokens, prompt_block_keys
from tetri.sim.requests import NoisyPredictor, SimRequest
from tetri.sim.workers import EventLoop, SimWorker, WorkerEnv


def build_env(cfg: SimConfig, cost: CostModel, loop: EventLoop, hooks) -> WorkerEnv:
    num_blocks = cfg.num_blocks or cost.kv_capacity_blocks(cfg.block_size)
    return WorkerEnv(loop=loop, cost=cost, hooks=hooks, num_blocks=num_blocks, block_size=cfg.block_size,
                     max_num_seqs=cfg.max_num_seqs, chunk_size_tokens=cfg.chunk_size_tokens,
                     max_batched_tokens=cfg.max_batched_tokens, prefill_policy=cfg.prefill_policy,
                     sched_batch=cfg.sched_batch, decode_policy=cfg.decode_policy,
                     heavy_decode_tokens=cfg.heavy_decode_tokens, check_invariants=cfg.check_invariants,
                     prefix_caching=cfg.prefix_caching,
                     host_blocks=cost.host_blocks(cfg.kv_offloading_size, cfg.block_size) if cfg.prefix_caching else 0,
                     swap_blocks=cost.host_blocks(cfg.swap_space, cfg.block_size), preemption_mode=cfg.preemption_mode,
                     step_budget=cfg.step_budget or "fixed", step_tpot_s=cfg.step_tpot_s)


def build_workers(cfg: SimConfig, env: WorkerEnv) -> list[SimWorker]:
    if cfg.mode == "colocated":
        return [ColocatedWorker(i, env) for i in range(cfg.num_gpus)]
    if cfg.mode == "colocated-chunked":
        return [ChunkedWorker(i, env) for i in range(cfg.num_gpus)]
    prefill, decode = cfg.split()
    if cfg.mode == "auto":  # prefill first, then mixed, decode last
        mixed = cfg.num_gpus - prefill - decode
        roles = ["prefill"] * prefill + ["mixed"] * mixed + ["decode"] * decode
        return [PDWorker(i, env, role) for i, role in enumerate(roles)]
    return [PDWorker(i, env, "prefill" if i < prefill else "decode") for i in range(prefill + decode)]


class Cluster:
    """The workers, the requests by id, and the front behind `SimFront`; also the workers'
    hooks (`WorkerEnv.hooks`): their messages go to the front, their finished requests here."""

    def __init__(self, cfg: SimConfig, cost: CostModel, loop: EventLoop, rng: random.Random) -> None:
        self.cfg = cfg
        self.cost = cost
        self.loop = loop
        self.env = build_env(cfg, cost, loop, self)
        self.workers = build_workers(cfg, self.env)
        self.reqs: dict[str, SimRequest] = self.env.reqs
        self.predictor = NoisyPredictor(cfg.predictor or "none", rng, cfg.predictor_accuracy, cfg.bucket_tokens,
                                        cfg.predictor_confusion)
        self.front = SimFront(self, cfg, rng, self.predictor)
        self.flips: list[tuple[float, int, str]] = []
        self.pending = 0
        self.on_finish = None
        """Optional callback(req) when a request finishes (the simulator's early stop)."""

    @property
    def decisions(self) -> list[dict]:
        return self.front.decisions

    def start(self) -> None:
        if self.front.policy is not None:
            self.loop.at(self.cfg.flip_interval_s, self._flip_tick)

    def _flip_tick(self) -> None:
        if self.pending == 0 and self.loop.idle:
            return  # nothing left to arrive or run
        self.front.flip_tick()
        self.loop.at(self.loop.now + self.cfg.flip_interval_s, self._flip_tick)

    def loads(self) -> list[WorkerLoad]:
        return [w.board_row() for w in self.workers]

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
        self.reqs[req.req_id] = req
        tokens = SimTokens(req.prompt_tokens, req.hash_ids, int(req.req_id[1:]) if req.req_id[1:].isdigit() else 0)
        if self.cfg.prefix_caching and req.hash_ids:
            req.block_keys = prompt_block_keys(req, tokens, self.env.block_size)
        self.front.arrive(req, tokens)

    def fail(self, req: SimRequest, why: str) -> None:
        if req.done_s is None and req.error is None:
            req.error = why
            self.pending -= 1

    # ---- hooks from workers ------------------------------------------------------------
    def chunk_done(self, msg) -> None:
        self.front.chunk_done(msg)

    def kv_copied(self, msg) -> None:
        self.front.kv_copied(msg)

    def token_batch(self, msg) -> None:
        self.front.token_batch(msg)

    def set_role(self, worker: SimWorker, role: str) -> None:
        """A SetRole arrived: the worker pauses, then takes the role after flip_latency_s."""
        worker.paused = True
        self.loop.at(self.loop.now + self.cfg.flip_latency_s, self._flipped, worker, role)

    def _flipped(self, worker: SimWorker, role: str) -> None:
        worker.role = role
        worker.paused = False
        worker.blocks.clear_cache()  # as the real worker: its cache goes with its old role
        worker.blocks.take_evicted()
        self.flips.append((self.loop.now, worker.worker_id, role))
        worker.kick()

    def finished(self, req: SimRequest, worker: SimWorker) -> None:
        """Its last token is out (what the client sees); the front learns it from the messages."""
        self.pending -= 1
        if self.on_finish is not None:
            self.on_finish(req)
