"""tetri-sim's entry point: requests in, per-request records and the tetri-bench report out.

    from tetri.sim.simulator import simulate, sim_report
    result = simulate(requests, SimConfig(mode="tetri", num_gpus=8), cost_model)
    report = sim_report(result, slo, extra_config)     # same JSON as tetri-bench

`requests` are `tetri.bench.workload.Request`s (the same workload builder tetri-bench uses);
a request without an arrival time (closed loop) arrives at 0. The run is deterministic for
a config (the seed feeds every random choice) and bounded: it stops when every request has
finished or at `max_sim_s` of simulated time (unfinished requests are then failed records).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tetri.bench.records import RequestRecord, Slo
from tetri.bench.report import build_report
from tetri.sim.cluster import Cluster
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import CostModel
from tetri.sim.requests import SimRequest, make_sim_request
from tetri.sim.workers import EventLoop


@dataclass
class SimResult:
    config: SimConfig
    requests: list[SimRequest]
    records: list[RequestRecord]
    duration_s: float
    finished: bool
    stats: dict[str, Any]


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
        "flips": len(cluster.flip.flips) if cluster.flip is not None else 0,
        "predictions": cluster.predictor.predictions,
        "mispredictions": cluster.predictor.misses,
    }


def simulate(requests: Sequence, cfg: SimConfig, cost: CostModel) -> SimResult:
    cfg = cfg.resolved()
    loop = EventLoop()
    cluster = Cluster(cfg, cost, loop, random.Random(cfg.seed))
    reqs = [make_sim_request(i, r.prompt_tokens, r.output_tokens, float(r.arrival_s or 0.0), cost.model.max_model_len)
            for i, r in enumerate(requests)]
    for req in reqs:
        loop.at(req.arrival_s, cluster.arrive, req)
    cluster.start()
    finished = loop.run(until_s=cfg.max_sim_s)
    for req in reqs:
        if req.done_s is None and req.error is None:
            req.error = f"not finished after {cfg.max_sim_s:g} s of simulated time"
    ends = [r.done_s for r in reqs if r.done_s is not None] + [r.arrival_s for r in reqs]
    duration_s = max(ends) if ends else 0.0
    records = [r.record() for r in reqs]
    return SimResult(cfg, reqs, records, duration_s, finished, _stats(cluster, loop, duration_s))


def sim_report(result: SimResult, slo: Slo | None = None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The tetri-bench JSON report of a simulated run; config gets the sim's settings and stats."""
    full = {**dict(config or {}), "sim": {**dataclasses.asdict(result.config), **result.stats}}
    return build_report(result.records, result.duration_s, slo, full)
