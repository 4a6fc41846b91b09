"""The simulator's one door to the real front scheduler (`tetri.sched.front.FrontScheduler`).

Every call the simulator makes into the front is in `SimFront`, as the server's engine
client makes them (`tetri/server/engine_client.py`, `worker_messages.py`):

    arrival           -> front.add(FrontReq, loads, now)
    ChunkDone         -> front.on_chunk_done(msg, loads, now)      (prefill worker, step end)
    KVCopied          -> front.on_kv_copied(msg)                   (decode worker, copy end)
    TokenBatch        -> front.on_token_batch(msg)                 (decode / mixed worker, step end)
    flip monitor tick -> front.flip_tick(loads, now)               (every flip_interval_s)

and every `Actions` they return is carried out the same way: each `(worker, message)` of
`sends` is delivered to that simulated worker (ChunkPlan, SubmitMixed, Handoff, Release,
Abort, SetRole), then the workers that got one are kicked; `fails` fail the request.
`loads` are the workers' `WorkerLoad` rows at that instant (one node: no staleness).

Requests carry no real text: `SimTokens` stands for a prompt's token ids (only its length
matters, and, with prefix caching, its blocks' hashes: tokens derived from the trace's
`hash_ids`, so two prompts share a block hash exactly when the trace says they share it).
"""

from __future__ import annotations

import random

from tetri.sched.dispatch import NoWorker
from tetri.sched.flip import FlipPolicy
from tetri.sched.front import FrontConfig, FrontReq, FrontScheduler
from tetri.sched.prefix_hash import block_hashes, cacheable_blocks
from tetri.sched.roles import RolePolicy
from tetri.sim.config import DISAGG_MODES, SimConfig
from tetri.sim.prefix import TRACE_BLOCK_TOKENS
from tetri.sim.requests import SimRequest
from tetri.types import SamplingParams


class SimTokens:
    """A prompt's token ids, made up on demand: position p of trace block k = p // 512 is
    `hash_ids[k] * 512 + p % 512`; past the trace's blocks, a value unique to the request."""

    __slots__ = ("n", "hash_ids", "salt")

    def __init__(self, n: int, hash_ids: tuple[int, ...], salt: int) -> None:
        self.n, self.hash_ids, self.salt = n, hash_ids, salt

    def __len__(self) -> int:
        return self.n

    def _at(self, p: int) -> int:
        k = p // TRACE_BLOCK_TOKENS
        if k < len(self.hash_ids):
            return self.hash_ids[k] * TRACE_BLOCK_TOKENS + p % TRACE_BLOCK_TOKENS
        return -1 - (self.salt << 32) - p

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._at(p) for p in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self._at(i % self.n)

    def __iter__(self):
        return (self._at(p) for p in range(self.n))

    def __add__(self, other):
        return [*self, *other]


def prompt_block_keys(req: SimRequest, tokens: SimTokens, block_size: int) -> list[bytes]:
    """The worker side's prefix-cache keys of a prompt: the real block hashes of its
    cacheable full blocks (the front hashes the same tokens the same way)."""
    return block_hashes(tokens, block_size, b"")[:cacheable_blocks(req.prompt_tokens, block_size)]


def make_flip_policy(cfg: SimConfig, cluster):
    """Mode auto: the adaptive `RolePolicy` (prefill / mixed / decode; the front then flips to
    mixed in place and lets mixed workers take handoffs, as `tetri-serve --mode auto`); `--flip` in disagg or
    tetri: `FlipPolicy`; otherwise None."""
    if cfg.mode == "auto":
        chunk = cfg.chunk_size_tokens
        busy_tokens = max(1, int(cfg.role_busy_s * chunk / cluster.cost.prefill_s([chunk])))
        return RolePolicy(busy_tokens, cfg.role_high, cfg.role_room, cfg.role_dwell_s, cfg.role_worker_dwell_s,
                          cfg.role_tpot_s, mixed_hands_off=False)  # as tetri-serve: mixed workers keep theirs
    if cfg.flip and cfg.mode in DISAGG_MODES:
        return FlipPolicy(window_s=cfg.flip_window_s, prefill_busy_tokens=4 * cfg.chunk_size_tokens)
    return None


class SimFront:
    def __init__(self, cluster, cfg: SimConfig, rng: random.Random, predictor) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.policy = make_flip_policy(cfg, cluster)
        fcfg = FrontConfig(chunk_size=cfg.prefill_chunk_tokens or cfg.chunk_size_tokens,
                           prefill_policy=cfg.prefill_policy, prefill_sched_batch=cfg.sched_batch,
                           global_policy=cfg.prefill_dispatch, dispatch_policy=cfg.decode_dispatch or "least-loaded",
                           heavy_decode_tokens=cfg.heavy_decode_tokens, prefix_caching=cfg.prefix_caching,
                           whole_prompts=cfg.mode == "disagg",
                           handoff_timeout_s=float("inf"), request_timeout_s=float("inf"))
        self.front = FrontScheduler(fcfg, rng, predictor=predictor, flip=self.policy)
        self._params: dict[int, SamplingParams] = {}

    @property
    def now(self) -> float:
        return self.cluster.loop.now

    def arrive(self, req: SimRequest, tokens: SimTokens) -> None:
        params = self._params.get(req.max_tokens)
        if params is None:
            params = self._params[req.max_tokens] = SamplingParams(max_tokens=req.max_tokens)
        freq = FrontReq(req.req_id, tokens, params, req.arrival_s, expected_output_tokens=req.output_tokens)
        try:
            acts = self.front.add(freq, self.cluster.loads(), self.now)
        except NoWorker as e:
            self.cluster.fail(req, f"no worker: {e}")
            return
        req.prefill_worker = freq.prefill_worker
        self.carry(acts)

    def chunk_done(self, msg) -> None:
        self.carry(self.front.on_chunk_done(msg, self.cluster.loads(), self.now))

    def kv_copied(self, msg) -> None:
        self.carry(self.front.on_kv_copied(msg))

    def token_batch(self, msg) -> None:
        self.carry(self.front.on_token_batch(msg))

    def flip_tick(self) -> None:
        self.carry(self.front.flip_tick(self.cluster.loads(), self.now))

    @property
    def decisions(self) -> list[dict]:
        """Every flip the front began: time, worker, from, to, reason."""
        return [{"t_s": round(t, 3), "worker": d.worker_id, "from": d.from_role, "to": d.to_role, "reason": d.reason}
                for t, d in self.front.role_decisions]

    def carry(self, acts) -> None:
        kicked = []
        for wid, msg in acts.sends:
            worker = self.cluster.workers[wid]
            worker.receive(msg)
            if worker not in kicked:
                kicked.append(worker)
        for req_id, why in acts.fails:
            self.cluster.fail(self.cluster.reqs[req_id], why)
        for worker in kicked:
            worker.kick()
