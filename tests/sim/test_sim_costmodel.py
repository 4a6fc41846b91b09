"""Cost model presets, its check against published numbers, and calibration."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tetri.sim.calibrate import CalSample, fit_hardware, load_calibration, sample_shape
from tetri.sim.profiling import profile
from tetri.sim.costmodel import (HARDWARE_PRESETS, MODEL_PRESETS, CostModel, ModelSpec, decode_shape,
                                 piece_shape)


def test_model_presets_match_published_sizes():
    params_b = {name: m.params / 1e9 for name, m in MODEL_PRESETS.items()}
    assert params_b["llama3-8b"] == pytest.approx(8.03, abs=0.05)
    assert params_b["llama2-13b"] == pytest.approx(13.0, abs=0.1)
    assert params_b["opt-13b"] == pytest.approx(12.9, abs=0.2)
    assert params_b["qwen2.5-32b"] == pytest.approx(32.8, abs=0.5)
    assert MODEL_PRESETS["llama3-8b"].kv_bytes_per_token == 131072  # GQA: 0.13 MB/token (papers.md §6.1)
    assert MODEL_PRESETS["opt-13b"].kv_bytes_per_token == 819200  # 0.82 MB/token (papers.md §1.6)


def test_embedded_default_model_matches_its_preset(default_model_dir):
    cfg = json.loads((__import__("pathlib").Path(default_model_dir) / "config.json").read_text())
    spec = ModelSpec.from_hf_config("tiny-default", cfg, bytes_per_param=4)
    assert spec == MODEL_PRESETS["tiny-default"]


def test_reproduces_distserve_a100_opt13b_fits():
    """papers.md §2.5: 512-token prefill ~72 ms (DistServe engine); batch-32 decode at context
    600 ~33 ms."""
    cost = CostModel(MODEL_PRESETS["opt-13b"], HARDWARE_PRESETS["a100"])
    assert cost.prefill_s([512]) == pytest.approx(0.072, rel=0.15)
    assert cost.decode_s(32, 32 * 600) == pytest.approx(0.033, rel=0.15)
    assert cost.transfer_s(512) == pytest.approx(512 * 819200 / 300e9, rel=0.1)


def test_roofline_shape():
    cost = CostModel(MODEL_PRESETS["llama3-8b"], HARDWARE_PRESETS["h200"])
    small, big = cost.decode_s(1, 100), cost.decode_s(8, 800)
    assert big < 1.2 * small  # small decode batches are memory bound: batching is nearly free
    assert cost.prefill_s([4096]) > 6 * cost.prefill_s([512])  # prefill is compute bound
    assert cost.step_s(piece_shape(512, 3000)) > cost.step_s(piece_shape(512, 0))  # attention over context
    assert HARDWARE_PRESETS["h200"].memory_bytes > HARDWARE_PRESETS["h100"].memory_bytes
    assert cost.kv_capacity_blocks(16) > CostModel(cost.model, HARDWARE_PRESETS["h100"]).kv_capacity_blocks(16)
    with pytest.raises(ValueError):
        CostModel(MODEL_PRESETS["qwen2.5-32b"], HARDWARE_PRESETS["v100"]).kv_capacity_blocks(16)


def _synthetic_samples(model: ModelSpec, truth) -> list[CalSample]:
    cost = CostModel(model, truth)
    samples = []
    for n in (16, 64, 256, 1024, 4096):
        for start in (0, n):
            samples.append(CalSample("prefill", piece_shape(n, start), cost.step_s(piece_shape(n, start))))
    for batch in (1, 4, 16, 64, 256):
        for ctx in (32, 256, 2048):
            shape = decode_shape(batch, batch * ctx)
            samples.append(CalSample("decode", shape, cost.step_s(shape)))
    return samples


@pytest.mark.parametrize("model_name", ["tiny-default", "llama-100m"])
def test_fit_recovers_known_factors(model_name):
    model = MODEL_PRESETS[model_name]
    base = HARDWARE_PRESETS["cpu"]
    truth = dataclasses.replace(base, prefill_compute_eff=0.05, decode_compute_eff=0.02, memory_eff=0.01,
                                prefill_overhead_s=3e-3, decode_overhead_s=1.5e-3)
    fit = fit_hardware(_synthetic_samples(model, truth), model, base)
    got = fit.hardware
    for field in ("prefill_compute_eff", "decode_compute_eff", "memory_eff", "prefill_overhead_s",
                  "decode_overhead_s"):
        assert getattr(got, field) == pytest.approx(getattr(truth, field), rel=1e-6), field
    assert fit.mean_abs_rel_error < 1e-9


def test_fit_keeps_unidentified_factors_and_nonnegative_overheads():
    model = MODEL_PRESETS["tiny-default"]
    base = HARDWARE_PRESETS["cpu"]
    # Only decode samples, all at a flat 1 ms: nothing informs the prefill factors.
    samples = [CalSample("decode", decode_shape(b, b * 32), 1e-3) for b in (1, 2, 4)]
    fit = fit_hardware(samples, model, base)
    assert fit.hardware.prefill_compute_eff == base.prefill_compute_eff
    assert fit.hardware.decode_overhead_s >= 0.0 and fit.mean_abs_rel_error < 0.05


def test_profile_the_real_engine_then_calibrate(tmp_path, default_model_dir):
    data = profile(default_model_dir, chunk_sizes=(16, 64), batch_sizes=(1, 4), contexts=(16, 64), repeats=1,
                   threads=1, trace_reqs=6)
    kinds = [s["kind"] for s in data["samples"]]
    assert (kinds.count("prefill"), kinds.count("decode"), kinds.count("mixed")) == (6, 4, 1)
    assert kinds.count("step") >= 6 + 4  # 6 prompts' prefill steps + a few decode steps
    assert all(s["measured_s"] > 0 for s in data["samples"])
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(data))
    model, fit = load_calibration(path)
    assert model.hidden == MODEL_PRESETS["tiny-default"].hidden and fit.hardware.name == "cpu"
    cost = CostModel(model, fit.hardware)
    # The fitted cpu preset reproduces the measurements (loosely: one repeat per point on a
    # noisy, shared host, so judge the typical sample, not the worst).
    errors = sorted(abs(cost.step_s(sample_shape(s)) / s["measured_s"] - 1) for s in data["samples"])
    assert errors[len(errors) // 2] < 0.5, errors


def test_fit_identifies_the_per_piece_overhead():
    model = MODEL_PRESETS["tiny-default"]
    base = HARDWARE_PRESETS["cpu"]
    truth = dataclasses.replace(base, piece_overhead_s=2e-4, prefill_overhead_s=1e-3)
    cost = CostModel(model, truth)
    samples = _synthetic_samples(model, truth)
    for pieces in (2, 4, 8):
        d = {"kind": "prefill", "new_tokens": 512, "start_tokens": 0, "pieces": pieces, "measured_s": 0.0}
        samples.append(CalSample("prefill", sample_shape(d), cost.step_s(sample_shape(d))))
    fit = fit_hardware(samples, model, base)
    assert fit.hardware.piece_overhead_s == pytest.approx(2e-4, rel=1e-6)
    assert fit.hardware.prefill_overhead_s == pytest.approx(1e-3, rel=1e-6)
