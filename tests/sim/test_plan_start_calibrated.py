"""tetri-serve --mode auto's start on the served model's own measured costs: tetri-plan with a
calibration simulates each candidate with the serving latencies measured live for *its*
deployment (`serving[colocated-chunked]`, `serving[disagg]`), and the CPU preset does not
replace the calibration's model."""

from __future__ import annotations

import json

from tetri.bench.records import Slo
from tetri.cli import build_parser, worker_specs
from tetri.sim.costmodel import HARDWARE_PRESETS, CostModel, ModelSpec
from tetri.sim.calibrate import sample_shape
from tetri.sim.plan import plan_start

MODEL = dict(name="calibrated:cmp", layers=6, hidden=384, heads=6, kv_heads=6, intermediate=1024, vocab=512,
             bytes_per_param=4, mlp_matrices=3, max_model_len=4096, tied_embeddings=False)
WORKLOAD = ["--length-scale", "0.25", "--max-prompt-tokens", "1024", "--max-output-tokens", "128",
            "--chunk-sizes", "256"]
SLO = Slo(2.0, 0.1)  # tools/compare_modes.py's


def calibration(tmp_path, serving: dict | None) -> str:
    """A profile whose samples the cpu preset reproduces exactly, with `serving` fits."""
    cost = CostModel(ModelSpec(**MODEL), HARDWARE_PRESETS["cpu"])
    grid = [dict(kind="prefill", new_tokens=n, start_tokens=s, pieces=p) for n in (16, 64, 256) for s in (0, 256)
            for p in (1, 4)]
    grid += [dict(kind="decode", batch_reqs=b, context_tokens=c) for b in (1, 4, 16, 32) for c in (32, 256)]
    samples = [dict(d, measured_s=cost.step_s(sample_shape(d))) for d in grid]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(dict(model=MODEL, samples=samples, **({"serving": serving} if serving else {}))))
    return str(path)


# what a live 2-worker CPU server adds per step in each deployment (of the order tools/calibrate_served.py
# measured): two mixed workers' prompt chunks slow each other, a prefill + decode pair much less
MEASURED = {"colocated-chunked": dict(request_latency_s=0.1, step_latency_s=0.04),
            "disagg": dict(request_latency_s=0.1, step_latency_s=0.015)}


def test_each_candidate_is_simulated_with_its_own_deployments_measured_latencies(tmp_path):
    measured = calibration(tmp_path, MEASURED)
    start = plan_start(2, SLO, ["--calibration", measured, *WORKLOAD])
    assert start.roles == ["prefill", "decode"] and start.label.startswith("tetri 1P:1D")
    # one fit for both (the old behaviour: none read) and the pick goes back to colocated
    same = calibration(tmp_path, {m: MEASURED["disagg"] for m in MEASURED})
    assert plan_start(2, SLO, ["--calibration", same, *WORKLOAD]).roles == ["mixed", "mixed"]


def test_the_server_plans_on_the_calibrations_model_not_the_cpu_preset(tmp_path):
    path = calibration(tmp_path, MEASURED)
    flags = " ".join(["--calibration", path, *WORKLOAD])
    args = build_parser().parse_args(["--mode", "auto", "--workers", "2", "--slo-ttft", "2", "--slo-tpot", "0.1",
                                      "--plan-flags", flags])
    assert [s.role for s in worker_specs(args)] == ["prefill", "decode"]
    assert args.auto_start["pick"].startswith("tetri 1P:1D")  # the cpu preset's model would pick colocated
