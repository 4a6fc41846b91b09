"""Serving latencies: the cost model's live-server share, fitted from one run (`fit-serving`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tetri.bench.workload import build_workload
from tetri.sim.calibrate import load_calibration
from tetri.sim.cli import main as sim_main
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import HARDWARE_PRESETS, MODEL_PRESETS, CostModel, decode_shape, piece_shape
from tetri.sim.serving_fit import fit_serving
from tetri.sim.simulator import sim_report, simulate

MODEL = MODEL_PRESETS["tiny-default"]
CPU = HARDWARE_PRESETS["cpu"]
LOAD = dict(workload="mixed", num_requests=40, rate=4.0, length_scale=0.25, max_prompt_tokens=1024,
            max_output_tokens=128)


def _reqs(seed: int = 0):
    return build_workload(trace=None, time_scale=None, seed=seed, **LOAD)


def _report(hw, mode: str = "colocated-chunked", seed: int = 0, gpus: int = 1) -> dict:
    cfg = SimConfig(mode=mode, num_gpus=gpus, chunk_size_tokens=256, seed=seed)
    return sim_report(simulate(_reqs(seed), cfg, CostModel(MODEL, hw)))


def test_latencies_enter_steps_and_arrivals():
    hw = dataclasses.replace(CPU, step_latency_s=1e-3, request_latency_s=5e-3)
    for shape in (piece_shape(64, 0), decode_shape(4, 128)):
        assert CostModel(MODEL, hw).step_s(shape) == pytest.approx(CostModel(MODEL, CPU).step_s(shape) + 1e-3)
    one = [build_workload(trace=None, workload="random", num_requests=1, rate=None, time_scale=None, seed=0,
                          length_scale=1.0, max_prompt_tokens=64, max_output_tokens=8)[0]]
    cfg = SimConfig(mode="colocated-chunked", num_gpus=1, chunk_size_tokens=256)
    bare, slow = (simulate(one, cfg, CostModel(MODEL, h)).records[0] for h in (CPU, hw))
    # An idle server: the request latency shifts TTFT once; the step latency adds per step.
    assert slow.ttft_s == pytest.approx(bare.ttft_s + 5e-3 + 1e-3, rel=1e-6)
    assert slow.e2e_s - slow.ttft_s == pytest.approx(bare.e2e_s - bare.ttft_s + 1e-3 * (slow.output_tokens - 1),
                                                     rel=1e-6)


@pytest.mark.parametrize("mode,gpus", [("colocated-chunked", 1), ("disagg", 2)])
def test_fit_recovers_known_latencies(mode, gpus):
    truth = dataclasses.replace(CPU, request_latency_s=6e-3, step_latency_s=4e-4)
    live = _report(truth, mode, gpus=gpus)
    cfg = SimConfig(mode=mode, num_gpus=gpus, chunk_size_tokens=256, seed=0)
    fit = fit_serving(_reqs(), cfg, CostModel(MODEL, CPU), live)
    assert fit.step_latency_s == pytest.approx(4e-4, rel=0.02)
    assert fit.request_latency_s == pytest.approx(6e-3, rel=0.05)
    assert fit.sim_ttft_s == pytest.approx(live["ttft_s"]["mean"], rel=0.01)
    assert fit.sim_tpot_s == pytest.approx(live["tpot_s"]["mean"], rel=0.01)


def test_fit_clamps_at_zero_when_the_live_run_is_faster_than_the_engine():
    live = _report(CPU)
    live = {**live, "ttft_s": {**live["ttft_s"], "mean": 0.5 * live["ttft_s"]["mean"]},
            "tpot_s": {**live["tpot_s"], "mean": 0.5 * live["tpot_s"]["mean"]}}
    cfg = SimConfig(mode="colocated-chunked", num_gpus=1, chunk_size_tokens=256, seed=0)
    fit = fit_serving(_reqs(), cfg, CostModel(MODEL, CPU), live)
    assert fit.step_latency_s == 0.0 and fit.request_latency_s == 0.0


def _calibration_file(tmp_path):
    """A calibration JSON whose engine samples are the cpu preset's own predictions."""
    cost = CostModel(MODEL, CPU)
    samples = [{"kind": "step", "shape": list(shape), "measured_s": cost.step_s(shape)}
               for shape in (piece_shape(n, s) for n in (16, 64, 256) for s in (0, n))]
    samples += [{"kind": "step", "shape": list(decode_shape(b, b * c)), "measured_s": cost.step_s(decode_shape(b, b * c))}
                for b in (1, 4, 16) for c in (32, 256)]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"version": 1, "model": dataclasses.asdict(MODEL), "samples": samples}))
    return path


def test_fit_serving_cli_stores_the_fit_per_mode(tmp_path, capsys):
    calib = _calibration_file(tmp_path)
    _, engine = load_calibration(calib)
    truth = dataclasses.replace(engine.hardware, request_latency_s=4e-3, step_latency_s=3e-4)
    live = tmp_path / "live.json"
    live.write_text(json.dumps(_report(truth)))
    flags = ["--mode", "colocated-chunked", "--gpus", "1", "--chunk-size", "256", "--workload", "mixed",
             "--num-requests", "40", "--rate", "4", "--length-scale", "0.25", "--max-prompt-tokens", "1024",
             "--max-output-tokens", "128", "--calibration", str(calib)]
    assert sim_main(["fit-serving", *flags, "--real", str(live)]) == 0
    assert "request latency 4.0" in capsys.readouterr().out
    stored = json.loads(calib.read_text())["serving"]["colocated-chunked"]
    assert stored["step_latency_s"] == pytest.approx(3e-4, rel=0.02)
    # Used for that mode only; a run with it reproduces the live report.
    _, fitted = load_calibration(calib, mode="colocated-chunked")
    assert fitted.hardware.request_latency_s == pytest.approx(4e-3, rel=0.05)
    assert load_calibration(calib, mode="disagg")[1].hardware.step_latency_s == 0.0
    out = tmp_path / "sim.json"
    assert sim_main([*flags, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["e2e_s"]["mean"] == pytest.approx(json.loads(live.read_text())["e2e_s"]["mean"],
                                                                        rel=0.02)
    assert sim_main(["fit-serving", *flags, "--real", str(tmp_path / "missing.json")]) == 2
