"""Calibration: measure the real engine (`tetri-sim profile`), then fit the cost model to it.

Profile: build the offline `LLM` on CPU and time `llm.executor.runner.run(segments)`, one
forward pass at a time, over a grid of prefill chunks (chunk size x tokens already cached)
and decode batches (batch size x context per request). The JSON written holds the model's
shape (from its config.json) and every measured time.

Fit: the cost model is `t = max(C * x_c, M * y) + o` per phase (C = FLOPs, M = bytes, from
`CostModel.features`), with x_c = 1 / (peak * compute_eff) separately for prefill and
decode, y = 1 / (bandwidth * memory_eff) shared, and an overhead o per phase. For a fixed
assignment of samples to the compute- or memory-bound branch this is linear, so the fit
alternates: assign each sample to the branch the current parameters say binds, solve the
weighted (relative-error) least squares for [x_prefill, x_decode, y, o_prefill, o_decode]
with numpy, and repeat until the assignment stops changing. A parameter no sample informs
keeps the preset's value.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tetri.sim.costmodel import (HARDWARE_PRESETS, CostModel, HardwareSpec, ModelSpec, StepShape, decode_shape,
                                 piece_shape)

PARAM_NAMES = ("x_prefill", "x_decode", "y_memory", "o_prefill", "o_decode")
MAX_FIT_ROUNDS = 50


@dataclass(frozen=True)
class CalSample:
    kind: str  # prefill | decode
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
                     1.0 / (hw.hbm_bytes_s * hw.memory_eff), hw.prefill_overhead_s, hw.decode_overhead_s])


def _hardware_of(base: HardwareSpec, p: np.ndarray) -> HardwareSpec:
    return dataclasses.replace(base, prefill_compute_eff=1.0 / (base.peak_flops * p[0]),
                               decode_compute_eff=1.0 / (base.peak_flops * p[1]),
                               memory_eff=1.0 / (base.hbm_bytes_s * p[2]),
                               prefill_overhead_s=float(p[3]), decode_overhead_s=float(p[4]))


def _design(feats: np.ndarray, kinds: np.ndarray, params: np.ndarray) -> np.ndarray:
    """One row per sample: the columns its current binding branch uses."""
    prefill = kinds == "prefill"
    x = np.where(prefill, params[0], params[1])
    compute_bound = feats[:, 0] * x >= feats[:, 1] * params[2]
    rows = np.zeros((len(feats), 5))
    rows[:, 0] = np.where(prefill & compute_bound, feats[:, 0], 0.0)
    rows[:, 1] = np.where(~prefill & compute_bound, feats[:, 0], 0.0)
    rows[:, 2] = np.where(~compute_bound, feats[:, 1], 0.0)
    rows[:, 3] = prefill.astype(float)
    rows[:, 4] = (~prefill).astype(float)
    return rows


def _solve(rows: np.ndarray, measured: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Relative-error least squares; columns with no data, or fitted <= 0, keep the prior
    (overheads fall to 0 instead), refitting the rest."""
    free = np.any(rows != 0, axis=0)
    params = prior.copy()
    for _ in range(len(prior)):
        fixed = ~free
        target = measured - rows[:, fixed] @ params[fixed]
        w = 1.0 / measured
        sol, *_ = np.linalg.lstsq(rows[:, free] * w[:, None], target * w, rcond=None)
        params[free] = sol
        bad = free & (params <= 0)
        if not bad.any():
            return params
        params[bad & (np.arange(len(prior)) >= 3)] = 0.0
        params[bad & (np.arange(len(prior)) < 3)] = prior[bad & (np.arange(len(prior)) < 3)]
        free &= ~bad
    return params


def fit_hardware(samples: list[CalSample], model: ModelSpec, base: HardwareSpec) -> FitResult:
    """Fit `base`'s efficiencies and overheads so the cost model reproduces `samples`."""
    if not samples:
        raise ValueError("no calibration samples")
    cost = CostModel(model, base)
    feats = np.array([cost.features(s.shape) for s in samples], dtype=np.float64)
    kinds = np.array([s.kind for s in samples])
    measured = np.array([s.measured_s for s in samples], dtype=np.float64)
    params = _params_of(base)
    rows = _design(feats, kinds, params)
    rounds = 0
    for rounds in range(1, MAX_FIT_ROUNDS + 1):
        params = _solve(rows, measured, _params_of(base))
        new_rows = _design(feats, kinds, params)
        if np.array_equal(new_rows, rows):
            break
        rows = new_rows
    hw = _hardware_of(base, params)
    fitted = CostModel(model, hw)
    predicted = np.array([fitted.step_s(s.shape) for s in samples])
    error = float(np.mean(np.abs(predicted - measured) / measured))
    return FitResult(hw, error, rounds, len(samples))


# ---------------------------------------------------------------- calibration files


def sample_from_dict(d: dict) -> CalSample:
    if d["kind"] == "prefill":
        shape = piece_shape(int(d["new_tokens"]), int(d["start_tokens"]))
    else:
        shape = decode_shape(int(d["batch_reqs"]), int(d["batch_reqs"]) * int(d["context_tokens"]))
    return CalSample(d["kind"], shape, float(d["measured_s"]))


def load_calibration(path: str | Path, base: HardwareSpec | None = None) -> tuple[ModelSpec, FitResult]:
    """Read a `tetri-sim profile` JSON; return its model and the fitted `cpu` hardware."""
    data = json.loads(Path(path).read_text())
    model = ModelSpec(**data["model"])
    samples = [sample_from_dict(d) for d in data["samples"]]
    return model, fit_hardware(samples, model, base or HARDWARE_PRESETS["cpu"])


# ---------------------------------------------------------------- profiling the real engine


def _time_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_spec(model_dir: str) -> ModelSpec:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return ModelSpec.from_hf_config(f"calibrated:{Path(model_dir).name}", cfg, bytes_per_param=4)


def _prefill_samples(llm, spec: ModelSpec, chunk_sizes, repeats: int) -> list[dict]:
    from tetri.workers.model_runner import Segment

    out = []
    for chunk in chunk_sizes:
        for start in (0, chunk):
            if start + chunk > spec.max_model_len:
                continue
            owner = f"prefill-{chunk}-{start}"
            blocks = llm.executor.blocks.allocate(owner, -(-(start + chunk) // llm.executor.block_size))
            ids = [(7 * i + 3) % spec.vocab for i in range(start + chunk)]
            seg = Segment(ids[start:], start, blocks, True)
            measured = _time_s(lambda: llm.executor.runner.run([seg]), repeats)
            llm.executor.blocks.free(owner)
            out.append({"kind": "prefill", "new_tokens": chunk, "start_tokens": start, "measured_s": measured})
    return out


def _decode_samples(llm, spec: ModelSpec, batch_sizes, contexts, repeats: int) -> list[dict]:
    from tetri.workers.model_runner import Segment

    out = []
    bs = llm.executor.block_size
    for batch in batch_sizes:
        for ctx in contexts:
            if ctx > spec.max_model_len:
                continue
            owners = [f"decode-{batch}-{ctx}-{i}" for i in range(batch)]
            segs = [Segment([(i + 5) % spec.vocab], ctx - 1, llm.executor.blocks.allocate(o, -(-ctx // bs)), True)
                    for i, o in enumerate(owners)]
            measured = _time_s(lambda: llm.executor.runner.run(segs), repeats)
            for o in owners:
                llm.executor.blocks.free(o)
            out.append({"kind": "decode", "batch_reqs": batch, "context_tokens": ctx, "measured_s": measured})
    return out


def profile(model_dir: str | None = None, chunk_sizes=(16, 64, 128, 256, 512), batch_sizes=(1, 4, 16, 32),
            contexts=(32, 256), repeats: int = 3, threads: int | None = None) -> dict:
    """Time the real engine's forward passes on CPU; returns the calibration dict."""
    import torch

    from tetri import LLM
    from tetri.workers.executor import resolve_model_dir

    if threads:
        torch.set_num_threads(threads)
    model_dir = resolve_model_dir(model_dir)
    spec = _model_spec(model_dir)
    need_tokens = max(max(batch_sizes) * (max(contexts) + 16), 2 * max(chunk_sizes) + 16)
    llm = LLM(model_dir, dtype="float32", chunk_size=max(chunk_sizes), num_blocks=need_tokens // 16 + 8)
    try:
        samples = _prefill_samples(llm, spec, chunk_sizes, repeats)
        samples += _decode_samples(llm, spec, batch_sizes, contexts, repeats)
    finally:
        llm.close()
    return {"version": 1, "model": dataclasses.asdict(spec), "model_dir": model_dir, "device": "cpu",
            "threads": torch.get_num_threads(), "repeats": repeats, "samples": samples}
