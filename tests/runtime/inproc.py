"""The whole disaggregated system in one process: real nodes (real model, real pools), the
real front scheduler, and messages routed by hand so a test controls every interleaving."""

from __future__ import annotations

import random
from collections import defaultdict, deque

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.protocol import ChunkDone, Dropped, KVCopied, PeerPools, TokenBatch
from tetri.sched.front import FrontConfig, FrontReq, FrontScheduler
from tetri.sched.load import WorkerLoad
from tetri.types import SamplingParams
from tetri.workers.executor import Executor
from tetri.workers.models.loader import load_model
from tetri.workers.node import WorkerNode, pool_info


class Cluster:
    def __init__(self, model_dir: str, roles=("prefill", "decode"), num_blocks=64, chunk_size=16,
                 decode_policy="greedy", request_timeout_s: float = 600.0, decode_blocks: int | None = None,
                 heavy_decode_tokens: int = 128, predictor=None, prefix_caching: bool = True, loaded=None,
                 kv_offloading_size: float = 0.0, dispatch_policy: str = "least-loaded",
                 global_policy: str = "least-loaded", swap_space: float = 0.0, preemption_mode: str = "auto",
                 flip=None) -> None:
        loaded = loaded or load_model(model_dir)
        extra = {} if heavy_decode_tokens == 128 else {"heavy_decode_tokens": heavy_decode_tokens}
        extra.update({} if preemption_mode == "auto" else {"preemption_mode": preemption_mode})
        sched = EngineSchedConfig(chunk_size=chunk_size, decode_policy=decode_policy, **extra)
        self.nodes: dict[int, WorkerNode] = {}
        pools = {}
        for wid, role in enumerate(roles):
            blocks = decode_blocks if role != "prefill" and decode_blocks is not None else num_blocks
            ex = Executor(ModelConfig(model=model_dir), CacheConfig(num_blocks=blocks, enable_prefix_caching=prefix_caching,
                                                                    kv_offloading_size=kv_offloading_size,
                                                                    swap_space=0.0 if role == "prefill" else swap_space),
                          loaded=loaded)
            pools[wid] = ex.pool
            self.nodes[wid] = WorkerNode(wid, role, ex, sched)
        infos = {wid: pool_info(p) for wid, p in pools.items()}
        for wid, node in self.nodes.items():
            node.pool_opener = _opener(infos, pools)
            node.handle(PeerPools(pools=infos), 0.0)
        seed = self.nodes[0].ex.hash_seed
        self.front = FrontScheduler(FrontConfig(chunk_size=chunk_size, request_timeout_s=request_timeout_s,
                                                prefix_caching=prefix_caching, prefix_hash_seed=seed,
                                                dispatch_policy=dispatch_policy, global_policy=global_policy,
                                                heavy_decode_tokens=heavy_decode_tokens),  # as tetri/cli.py
                                    random.Random(0), predictor=predictor, flip=flip)
        self.to_workers: dict[int, deque] = {w: deque() for w in self.nodes}
        self.to_front: deque = deque()
        self.sent: list[tuple[int, str, str]] = []
        """(worker, its role then, message type) of every message sent to a worker."""
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finished: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.dead: set[int] = set()
        self.now = 0.0

    def loads(self) -> list[WorkerLoad]:
        return [WorkerLoad(worker_id=w, state="dead" if w in self.dead else "ready", **n.board_fields())
                for w, n in self.nodes.items()]

    def apply(self, acts) -> None:
        for wid, msg in acts.sends:
            if wid not in self.dead:
                self.to_workers[wid].append(msg)
                self.sent.append((wid, self.nodes[wid].role, type(msg).__name__))
        for req_id, why in acts.fails:
            self.failed[req_id] = why

    def submit(self, req_id: str, prompt: list[int], max_tokens: int = 8, n: int = 1, priority: int = 0,
               expected_output_tokens: int | None = None) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)
        extra = {"priority": priority} if priority else {}
        req = FrontReq(req_id, prompt, params, self.now, expected_output_tokens=expected_output_tokens, **extra)
        self.apply(self.front.add(req, self.loads(), self.now))

    def round(self) -> None:
        """Deliver every message, step every node with work once, hand the outputs to the front."""
        for wid in self.nodes:
            if wid not in self.dead:
                self.deliver(wid)
        for wid, node in self.nodes.items():
            if wid not in self.dead and node.has_work():
                self.step(wid)
        self.pump_front()

    def abort(self, req_id: str) -> None:
        self.apply(self.front.abort(req_id))

    def flip_tick(self) -> None:
        """The supervisor's flip tick (role policy, drain, SetRole, resume)."""
        self.apply(self.front.flip_tick(self.loads(), self.now))

    def deliver(self, wid: int) -> None:
        while self.to_workers[wid]:
            self.to_front.extend(self.nodes[wid].handle(self.to_workers[wid].popleft(), self.now))

    def step(self, wid: int) -> None:
        self.now += 0.01
        self.to_front.extend(self.nodes[wid].step(self.now))
        self.check()

    def pump_front(self) -> None:
        while self.to_front:
            msg = self.to_front.popleft()
            if isinstance(msg, ChunkDone):  # as the engine client does: only the `current` results count
                acts = self.front.on_chunk_done(msg, self.loads(), self.now)
                for i in acts.current:
                    self.tokens[msg.finished[i].req_id].append(msg.finished[i].first_tokens[0])
                self.apply(acts)
            elif isinstance(msg, KVCopied):
                self.apply(self.front.on_kv_copied(msg))
            elif isinstance(msg, Dropped):
                self.apply(self.front.on_dropped(msg.req_id))
            elif isinstance(msg, TokenBatch):
                acts = self.front.on_token_batch(msg)
                for i in acts.current:
                    self.tokens[msg.req_ids[i]].append(msg.token_ids[i])
                    if msg.finish_reasons[i] is not None:
                        self.finished[msg.req_ids[i]] = msg.finish_reasons[i]
                self.apply(acts)

    def run(self, max_rounds: int = 500) -> None:
        """Deliver and step everything until no node has work and no message is in flight."""
        for _ in range(max_rounds):
            for wid in self.nodes:
                if wid not in self.dead:
                    self.deliver(wid)
            self.pump_front()
            busy = [w for w, n in self.nodes.items() if w not in self.dead and n.has_work()]
            if not busy and not self.to_front and not any(self.to_workers[w] for w in self.nodes if w not in self.dead):
                return
            for wid in busy:
                self.step(wid)
        raise AssertionError("cluster did not go idle")

    def serve_in_order(self, prompts, max_tokens: int = 6) -> dict[str, list[int]]:
        """Submit each prompt as "r<i>" and run the cluster idle before the next (a conversation's
        turns), block invariants checked after each; the tokens each request got."""
        for i, p in enumerate(prompts):
            self.submit(f"r{i}", p, max_tokens=max_tokens)
            self.run()
            self.check()
        return dict(self.tokens)

    def check(self) -> None:
        for node in self.nodes.values():
            node.ex.blocks.check_invariants()

    def blocks_used(self) -> dict[int, int]:
        return {w: n.ex.blocks.num_used for w, n in self.nodes.items() if w not in self.dead}


def _opener(infos, pools):
    def open_pool(info):
        for wid, i in infos.items():
            if i is info:  # pools here are not shared memory, so infos differ only by identity
                return pools[wid]
        raise KeyError(info)

    return open_pool
