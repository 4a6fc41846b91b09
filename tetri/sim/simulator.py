"""tetri-sim's entry point: requests in, per-request records and the tetri-bench report out.

    from tetri.sim.simulator import simulate, sim_report
    result = simulate(requests, SimConfig(mode="tetri", num_gpus=8), cost_model)
    report = sim_report(result, slo, extra_config)     # same JSON as tetri-bench

`requests` are `tetri.bench.workload.Request`s (the same workload builder tetri-bench uses);
a request without an arrival time (closed loop) arrives at 0. The run is deterministic for
a config (the seed feeds every random choice) and bounded: it stops when every request has
finished or at `max_sim_s` of simulated time (unfinished requests are then failed records).
`early_stop=(slo, target)` also stops it as soon as the verdict "attainment >= target" is
certain either way: so many requests missed the SLO that `target` is out of reach, or so
many met it that it is reached (tetri-plan's rate search needs only that verdict; the
unfinished requests are then failed records, so use such a run for nothing else).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tetri.bench.records import RequestRecord, Slo
from tetri.bench.report import build_report
from tetri.sim.cluster import Cluster
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import CostModel
from tetri.sim.requests import SimRequest, make_sim_request
from tetri.sim.swap import swap_stats
from tetri.sim.workers import EventLoop


@dataclass
class SimResult:
    config: SimConfig
    requests: list[SimRequest]
    records: list[RequestRecord]
    duration_s: float
    finished: bool
    stats: dict[str, Any]


class MissCounter:
    """Counts SLO misses as they become certain (no first token by arrival + TTFT SLO, or a
    finished request over either limit) and hits; stops the loop once the verdict is known."""

    def __init__(self, loop: EventLoop, slo: Slo, target: float, num_reqs: int) -> None:
        self.loop = loop
        self.slo = slo
        self.needed = math.ceil(target * num_reqs - 1e-9)
        self.allowed = num_reqs - self.needed
        self.missed: set[str] = set()
        self.met = 0

    def miss(self, req: SimRequest) -> None:
        self.missed.add(req.req_id)
        if len(self.missed) > self.allowed:
            self.loop.stop()

    def watch(self, req: SimRequest) -> None:
        if math.isfinite(self.slo.ttft_s):
            self.loop.at(req.arrival_s + self.slo.ttft_s, self._ttft_check, req)

    def _ttft_check(self, req: SimRequest) -> None:
        if req.generated_tokens == 0:
            self.miss(req)

    def finished(self, req: SimRequest) -> None:
        if req.req_id in self.missed:
            return
        if not self.slo.met_by(req.record()):
            self.miss(req)
            return
        self.met += 1
        if self.met >= self.needed:
            self.loop.stop()


def _stats(cluster: Cluster, loop: EventLoop, duration_s: float) -> dict[str, Any]:
    workers = cluster.env.stats
    busy_s = sum(w.busy_s for w in workers.values())
    return {
        "events": loop.events,
        "workers": len(cluster.workers),
        "kv_blocks_per_worker": cluster.env.num_blocks,
        "steps": sum(w.steps for w in workers.values()),
        "preemptions": sum(w.preemptions for w in workers.values()),
        "forced_admissions": sum(w.forced_admissions for w in workers.values()),
        "gpu_busy_share": busy_s / (duration_s * len(cluster.workers)) if duration_s > 0 else 0.0,
        "gpu_seconds": duration_s * len(cluster.workers),
        "flips": len(cluster.flips),
        "role_decisions": cluster.decisions,
        "roles_final": dict(sorted(Counter(w.role for w in cluster.workers).items())),
        "predictions": cluster.predictor.predictions,
        "mispredictions": cluster.predictor.misses,
        "stopped_early": loop.stopped,
        **_prefix_stats(cluster),
        **swap_stats(cluster.workers),
    }


def _prefix_stats(cluster: Cluster) -> dict[str, Any]:
    """Prefix-cache hits over every worker that prefilled (vLLM's queries/hits, in tokens)."""
    if not cluster.cfg.prefix_caching:
        return {}
    queries = sum(w.blocks.queries for w in cluster.workers)
    hits = sum(w.blocks.hits for w in cluster.workers)
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "prefix_cache_evictions": sum(w.blocks.evictions for w in cluster.workers),
            "prefix_cache_host_hits": sum(w.blocks.host_hits for w in cluster.workers),
            "kv_offloaded_blocks": sum(w.blocks.offloaded_blocks for w in cluster.workers),
            "kv_uploaded_blocks": sum(w.blocks.uploaded_blocks for w in cluster.workers),
            "host_blocks_per_worker": cluster.env.host_blocks}


def simulate(requests: Sequence, cfg: SimConfig, cost: CostModel,
             early_stop: tuple[Slo, float] | None = None) -> SimResult:
    cfg = cfg.resolved()
    loop = EventLoop()
    cluster = Cluster(cfg, cost, loop, random.Random(cfg.seed))
    reqs = [make_sim_request(i, r.prompt_tokens, r.output_tokens, float(r.arrival_s or 0.0), cost.model.max_model_len,
                             tuple(getattr(r, "hash_ids", ()) or ()), cfg.prefix_caching)
            for i, r in enumerate(requests)]
    misses = MissCounter(loop, early_stop[0], early_stop[1], len(reqs)) if early_stop else None
    cluster.on_finish = misses.finished if misses else None
    for req in reqs:
        loop.at(req.arrival_s + cost.hw.request_latency_s, cluster.arrive, req)  # latencies count from arrival_s
        if misses is not None:
            misses.watch(req)
    cluster.start()
    finished = loop.run(until_s=cfg.max_sim_s)
    why = "stopped early: the SLO verdict was already certain" if loop.stopped else \
        f"not finished after {cfg.max_sim_s:g} s of simulated time"
    for req in reqs:
        if req.done_s is None and req.error is None:
            req.error = why
    ends = [r.done_s for r in reqs if r.done_s is not None] + [r.arrival_s for r in reqs]
    duration_s = max(ends) if ends else 0.0
    records = [r.record() for r in reqs]
    stats = _stats(cluster, loop, duration_s)
    if cfg.prefix_caching:
        from tetri.sim.prefix import ideal_hit_rate

        stats["prefix_cache_ideal_hit_rate"] = ideal_hit_rate(requests, cfg.block_size)
        prefillers = sum(w.role == "prefill" for w in cluster.workers)
        prefill_blocks = cluster.env.num_blocks * prefillers
        stats["prefix_cache_pooled_lru_hit_rate"] = ideal_hit_rate(requests, cfg.block_size, prefill_blocks)
        if cluster.env.host_blocks:  # the same bound with the host tiers' blocks pooled in too
            stats["prefix_cache_pooled_lru_with_host_hit_rate"] = ideal_hit_rate(
                requests, cfg.block_size, prefill_blocks + cluster.env.host_blocks * prefillers)
    return SimResult(cfg, reqs, records, duration_s, finished, stats)


def sim_report(result: SimResult, slo: Slo | None = None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The tetri-bench JSON report of a simulated run; config gets the sim's settings and stats."""
    full = {**dict(config or {}), "sim": {**dataclasses.asdict(result.config), **result.stats}}
    return build_report(result.records, result.duration_s, slo, full)
