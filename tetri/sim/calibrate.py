"""Calibration: fit the cost model to the real engine's measured step times.

The measurements come from `tetri.sim.profiling` (`tetri-sim profile`).

Fit: per phase the cost model is
    t = max(D * x, W * y) + A * x + K * y + o + pieces * o_piece
(D dense FLOPs, A attention FLOPs, W weight bytes, K KV bytes, from `CostModel.features`)
with x = 1 / (peak * compute_eff) separately for prefill and decode, y = 1 / (bandwidth *
memory_eff) shared, an overhead o per phase and one per prompt piece. For a fixed assignment
of samples to the compute- or weight-bound branch of the max this is linear, so the fit
alternates: assign each sample to the branch the current parameters say binds, solve the
weighted (relative-error) least squares for [x_prefill, x_decode, y, o_prefill, o_decode,
o_piece] with numpy, and repeat until the assignment stops changing. A parameter no sample
informs (e.g. o_piece without multi-piece samples) keeps the preset's value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tetri.sim.costmodel import (HARDWARE_PRESETS, CostModel, HardwareSpec, ModelSpec, StepShape, add_shapes,
                                 decode_shape, piece_shape)

PARAM_NAMES = ("x_prefill", "x_decode", "y_memory", "o_prefill", "o_decode", "o_piece")
OVERHEAD_COLUMNS = (3, 4, 5)
MAX_FIT_ROUNDS = 50


@dataclass(frozen=True)
class CalSample:
    kind: str  # prefill | decode | mixed (decodes + a prompt chunk) | step (one step of a real run)
    shape: StepShape
    measured_s: float


@dataclass(frozen=True)
class FitResult:
    hardware: HardwareSpec
    mean_abs_rel_error: float
    rounds: int
    samples: int


def _params_of(hw: HardwareSpec) -> np.ndarray:
    return np.array([1.0 / (hw.peak_flops * hw.prefill_compute_eff), 1.0 / (hw.peak_flops * hw.decode_compute_eff),
                     1.0 / (hw.hbm_bytes_s * hw.memory_eff), hw.prefill_overhead_s, hw.decode_overhead_s,
                     hw.piece_overhead_s])


def _hardware_of(base: HardwareSpec, p: np.ndarray) -> HardwareSpec:
    p = [float(v) for v in p]
    return dataclasses.replace(base, prefill_compute_eff=1.0 / (base.peak_flops * p[0]),
                               decode_compute_eff=1.0 / (base.peak_flops * p[1]),
                               memory_eff=1.0 / (base.hbm_bytes_s * p[2]), prefill_overhead_s=p[3],
                               decode_overhead_s=p[4], piece_overhead_s=p[5])


def _design(feats: np.ndarray, prefill: np.ndarray, params: np.ndarray) -> np.ndarray:
    """One row per sample: its coefficients on each parameter, given the branch that binds.
    feats columns: dense FLOPs, attention FLOPs, weight bytes, KV bytes, pieces."""
    x = np.where(prefill, params[0], params[1])
    compute_bound = feats[:, 0] * x >= feats[:, 2] * params[2]
    flops = np.where(compute_bound, feats[:, 0], 0.0) + feats[:, 1]
    rows = np.zeros((len(feats), len(PARAM_NAMES)))
    rows[:, 0] = np.where(prefill, flops, 0.0)
    rows[:, 1] = np.where(prefill, 0.0, flops)
    rows[:, 2] = np.where(compute_bound, 0.0, feats[:, 2]) + feats[:, 3]
    rows[:, 3] = prefill.astype(float)
    rows[:, 4] = (~prefill).astype(float)
    rows[:, 5] = feats[:, 4]
    return rows


def _identified(feats: np.ndarray, prefill: np.ndarray) -> np.ndarray:
    """Columns some sample informs; o_piece needs prefill samples with different piece counts
    (else it is collinear with o_prefill)."""
    ok = np.ones(len(PARAM_NAMES), dtype=bool)
    ok[[0, 3]] = prefill.any()
    ok[[1, 4]] = (~prefill).any()
    ok[5] = len(set(feats[prefill, 4].tolist())) > 1
    return ok


def _solve(rows: np.ndarray, measured: np.ndarray, prior: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Relative-error least squares over the `free` columns (the rest keep the prior). A rate
    fitted <= 0 falls back to the prior, an overhead to 0; the others are then refitted."""
    free = free.copy()
    params = prior.copy()
    overhead = np.isin(np.arange(len(prior)), OVERHEAD_COLUMNS)
    w = 1.0 / measured
    for _ in range(len(prior)):
        target = measured - rows[:, ~free] @ params[~free]
        sol, *_ = np.linalg.lstsq(rows[:, free] * w[:, None], target * w, rcond=None)
        params[free] = sol
        bad = free & (params <= 0) & ~(overhead & (params == 0))
        if not bad.any():
            break
        params[bad & overhead] = 0.0
        params[bad & ~overhead] = prior[bad & ~overhead]
        free &= ~bad
    return params


def fit_hardware(samples: list[CalSample], model: ModelSpec, base: HardwareSpec) -> FitResult:
    """Fit `base`'s efficiencies and overheads so the cost model reproduces `samples`."""
    if not samples:
        raise ValueError("no calibration samples")
    cost = CostModel(model, base)
    feats = np.array([cost.features(s.shape) for s in samples], dtype=np.float64)
    prefill = np.array([s.shape.prefill_tokens > 0 for s in samples])
    measured = np.array([s.measured_s for s in samples], dtype=np.float64)
    prior = _params_of(base)
    free = _identified(feats, prefill)
    params, rows, rounds = prior, _design(feats, prefill, prior), 0
    for rounds in range(1, MAX_FIT_ROUNDS + 1):
        params = _solve(rows, measured, prior, free)
        new_rows = _design(feats, prefill, params)
        if np.array_equal(new_rows, rows):
            break
        rows = new_rows
    hw = _hardware_of(base, params)
    fitted = CostModel(model, hw)
    predicted = np.array([fitted.step_s(s.shape) for s in samples])
    error = float(np.mean(np.abs(predicted - measured) / measured))
    return FitResult(hw, error, rounds, len(samples))


# ---------------------------------------------------------------- calibration files


def sample_shape(d: dict) -> StepShape:
    """The step a profile sample measured: `pieces` equal prompt pieces of `new_tokens` in
    all (prefill, mixed) after `start_tokens` cached, plus `batch_reqs` decodes of
    `context_tokens` each (decode, mixed); a `step` sample lists its StepShape fields."""
    if d["kind"] == "step":
        return StepShape(*(int(v) for v in d["shape"]))
    shape = StepShape()
    if d["kind"] in ("prefill", "mixed"):
        pieces = int(d.get("pieces", 1))
        for _ in range(pieces):
            shape = add_shapes(shape, piece_shape(int(d["new_tokens"]) // pieces, int(d.get("start_tokens", 0))))
    if d["kind"] in ("decode", "mixed"):
        batch = int(d["batch_reqs"])
        shape = add_shapes(shape, decode_shape(batch, batch * int(d["context_tokens"])))
    return shape


def sample_from_dict(d: dict) -> CalSample:
    return CalSample(d["kind"], sample_shape(d), float(d["measured_s"]))


def load_calibration(path: str | Path, base: HardwareSpec | None = None,
                     mode: str | None = None) -> tuple[ModelSpec, FitResult]:
    """Read a `tetri-sim profile` JSON; return its model and the fitted `cpu` hardware, with
    the serving latencies `tetri-sim fit-serving` stored for `mode` (if any)."""
    data = json.loads(Path(path).read_text())
    model = ModelSpec(**data["model"])
    samples = [sample_from_dict(d) for d in data["samples"]]
    fit = fit_hardware(samples, model, base or HARDWARE_PRESETS["cpu"])
    serving = data.get("serving", {}).get(mode) if mode else None
    if serving:
        hw = dataclasses.replace(fit.hardware, request_latency_s=float(serving["request_latency_s"]),
                                 step_latency_s=float(serving["step_latency_s"]))
        fit = dataclasses.replace(fit, hardware=hw)
    return model, fit
