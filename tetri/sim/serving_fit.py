"""Fit the serving stack's latencies to one live run (`tetri-sim fit-serving`).

`tetri-sim profile` times bare engine steps; a live server adds its own time on top: HTTP,
dispatch and first-token delivery for each request, and, for each step, the worker loop's
socket I/O and the front process competing for the same host. Two parameters of the cost
model hold that share (`HardwareSpec.request_latency_s` and `step_latency_s`). Given the
tetri-bench report of a live run and the same workload, this finds the pair for which the
simulator reproduces the run's mean TPOT and mean TTFT:

- `step_latency_s` by bisection on mean TPOT (which grows with it);
- `request_latency_s` by fixed-point steps on mean TTFT (a shift of arrivals moves TTFT
  almost one for one; queueing makes it slightly more or less);

alternating a few rounds, since each moves the other's target a little. The fit is stored
in the calibration JSON under `serving[<sim mode>]` and used by `tetri-sim --calibration`
for that mode; check it on a *different* workload (`tools/validate_sim.py` does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tetri.sim.config import SimConfig
from tetri.sim.costmodel import CostModel
from tetri.sim.simulator import sim_report, simulate

MAX_STEP_LATENCY_S = 0.05
BISECT_ROUNDS = 24
ROUNDS = 4


@dataclass(frozen=True)
class ServingFit:
    request_latency_s: float
    step_latency_s: float
    real_ttft_s: float
    real_tpot_s: float
    sim_ttft_s: float
    sim_tpot_s: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _means(reqs: Sequence, cfg: SimConfig, cost: CostModel, request_s: float, step_s: float) -> tuple[float, float]:
    hw = dataclasses.replace(cost.hw, request_latency_s=request_s, step_latency_s=step_s)
    report = sim_report(simulate(reqs, cfg, CostModel(cost.model, hw)))
    if not report["completed"]:
        raise ValueError("the simulated run completed no request; check the workload and config")
    return report["ttft_s"]["mean"], report["tpot_s"]["mean"]


def fit_serving(reqs: Sequence, cfg: SimConfig, cost: CostModel, real_report: Mapping[str, Any]) -> ServingFit:
    """The (request, step) latencies that make the simulated run of `reqs` match the live
    run's mean TTFT and TPOT (`real_report`: tetri-bench's JSON for the same workload)."""
    real_ttft, real_tpot = real_report["ttft_s"]["mean"], real_report["tpot_s"]["mean"]
    if not real_report.get("completed") or real_ttft is None or real_tpot is None:
        raise ValueError("the live report needs completed requests with TTFT and TPOT (outputs of 2+ tokens)")
    request_s, step_s = 0.0, 0.0
    for _ in range(ROUNDS):
        lo, hi = 0.0, MAX_STEP_LATENCY_S
        if _means(reqs, cfg, cost, request_s, lo)[1] >= real_tpot:
            hi = 0.0  # the bare engine is already as slow as the live run
        for _ in range(BISECT_ROUNDS):
            if hi - lo < 1e-6:
                break
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _means(reqs, cfg, cost, request_s, mid)[1] < real_tpot else (lo, mid)
        step_s = (lo + hi) / 2
        for _ in range(3):
            sim_ttft = _means(reqs, cfg, cost, request_s, step_s)[0]
            request_s = max(0.0, request_s + real_ttft - sim_ttft)
    sim_ttft, sim_tpot = _means(reqs, cfg, cost, request_s, step_s)
    return ServingFit(request_s, step_s, real_ttft, real_tpot, sim_ttft, sim_tpot)
