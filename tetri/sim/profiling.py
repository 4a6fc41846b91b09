"""Profiling the real engine for calibration (`tetri-sim profile`), and checking the result.

Profile: build the offline `LLM` on CPU and time whole engine steps (`MixedCore.step()` on
its executor: scheduling, block accounting, the forward pass `runner.run(segments)` and
sampling) over a grid of prefill chunks (chunk size x tokens already cached, and chunks
packed from 4 prompts), decode batches (batch size x context per request), a few
mixed steps (a decode batch plus a prompt chunk, as the colocated engine runs them), and
every step of a small random workload run to completion (its shapes vary from step to step
as in service, which the grid's repeated shapes do not show). The JSON written holds the model's shape (from
its config.json) and every measured time (median of the repeats).

`validate(...)` then runs a fresh random workload through the real engine and through the
simulator with the fitted cost model (mode colocated-chunked, one worker, everything
arriving at once) and compares the makespans.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

from tetri.sim.costmodel import ModelSpec, StepShape, add_shapes, decode_shape, piece_shape

def _model_spec(model_dir: str) -> ModelSpec:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return ModelSpec.from_hf_config(f"calibrated:{Path(model_dir).name}", cfg, bytes_per_param=4)


def _timed_step_s(core) -> float:
    start = time.perf_counter()
    core.step()
    return time.perf_counter() - start


def _core(executor, chunk_tokens: int, max_seqs: int = 256):
    from tetri.config import EngineSchedConfig
    from tetri.workers.mixed import MixedCore

    return MixedCore(executor, EngineSchedConfig(chunk_size=chunk_tokens, max_num_seqs=max_seqs))


def _params(max_tokens: int):
    from tetri.types import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return [(7 * i + seed) % vocab for i in range(n)]


def _prefill_samples(executor, spec: ModelSpec, chunk_sizes, repeats: int) -> list[dict]:
    """Real engine steps of one chunk: a 2*chunk prompt runs as (chunk after 0) then (chunk
    after chunk); and a chunk packed from 4 prompts of chunk/4 tokens."""
    out = []
    for chunk in chunk_sizes:
        prompt_tokens = 2 * chunk if 2 * chunk < spec.max_model_len else chunk
        core = _core(executor, chunk)
        times: dict[tuple[int, int], list[float]] = {(0, 1): [], (chunk, 1): [], (0, 4): []}
        for rep in range(repeats + 1):  # the first round warms up
            core.add_request(f"p{chunk}-{rep}", _ids(prompt_tokens, 3, spec.vocab), _params(1))
            for start in range(0, prompt_tokens, chunk):
                elapsed = _timed_step_s(core)
                times[(start, 1)].append(elapsed) if rep else None
            if chunk >= 8:
                for i in range(4):
                    core.add_request(f"q{chunk}-{rep}-{i}", _ids(chunk // 4, i, spec.vocab), _params(1))
                elapsed = _timed_step_s(core)
                times[(0, 4)].append(elapsed) if rep else None
            while core.has_work():
                core.step()
        out += [{"kind": "prefill", "new_tokens": chunk // pieces * pieces, "start_tokens": start, "pieces": pieces,
                 "measured_s": statistics.median(ts)} for (start, pieces), ts in times.items() if ts]
    return out


def _decode_samples(executor, spec: ModelSpec, batch_sizes, contexts, repeats: int) -> list[dict]:
    """Real engine decode steps of `batch` requests whose prompts are `context` tokens."""
    out = []
    for batch in batch_sizes:
        for ctx in contexts:
            if ctx + repeats + 3 > spec.max_model_len:
                continue
            core = _core(executor, batch * ctx, max(batch, 1))
            for i in range(batch):
                core.add_request(f"d{batch}-{ctx}-{i}", _ids(ctx, i, spec.vocab), _params(repeats + 3))
            while core.num_waiting:
                core.step()  # prefill every prompt (and the first decode or two)
            _timed_step_s(core)  # warm-up
            times = [_timed_step_s(core) for _ in range(repeats)]
            while core.has_work():
                core.step()
            out.append({"kind": "decode", "batch_reqs": batch, "context_tokens": ctx + 2 + repeats // 2,
                        "measured_s": statistics.median(times)})
    return out


def _mixed_samples(executor, spec: ModelSpec, batch_sizes, chunk_sizes, context: int, repeats: int) -> list[dict]:
    """Real engine steps that decode `batch` requests and prefill one `chunk`-token prompt."""
    out = []
    for batch in batch_sizes:
        for chunk in chunk_sizes:
            if context + chunk + 2 * repeats + 8 > spec.max_model_len:
                continue
            core = _core(executor, chunk)
            for i in range(batch):
                core.add_request(f"m{batch}-{chunk}-{i}", _ids(context, i, spec.vocab), _params(2 * repeats + 8))
            while core.num_waiting:
                core.step()
            times = []
            for rep in range(repeats + 1):
                core.add_request(f"n{batch}-{chunk}-{rep}", _ids(chunk, 11, spec.vocab), _params(1))
                elapsed = _timed_step_s(core)
                times.append(elapsed) if rep else None
            while core.has_work():
                core.step()
            out.append({"kind": "mixed", "new_tokens": chunk, "start_tokens": 0, "batch_reqs": batch,
                        "context_tokens": context + repeats, "measured_s": statistics.median(times)})
    return out


def shape_of(segments) -> StepShape:
    """The cost model's view of one `runner.run(segments)` call."""
    shape = StepShape()
    decodes, context = 0, 0
    for seg in segments:
        if len(seg.token_ids) == 1:
            decodes += 1
            context += seg.start_pos + 1
        else:
            shape = add_shapes(shape, piece_shape(len(seg.token_ids), seg.start_pos, seg.sample))
    return add_shapes(shape, decode_shape(decodes, context)) if decodes else shape


def _trace_samples(executor, spec: ModelSpec, num_reqs: int, chunk: int, seed: int = 0) -> list[dict]:
    """Every step of a small random workload run to completion (shapes vary step to step, as
    in service): each step's shape, captured from the runner's segments, and its time."""
    rng = random.Random(seed)
    core = _core(executor, chunk)
    for i in range(num_reqs):
        prompt_tokens = rng.randint(16, min(400, spec.max_model_len // 2))
        core.add_request(f"t{i}", _ids(prompt_tokens, i, spec.vocab), _params(rng.randint(4, 64)))
    runner = executor.runner
    shapes: list[StepShape] = []
    original = runner.run
    runner.run = lambda segments: (shapes.append(shape_of(segments)), original(segments))[1]
    out = []
    try:
        while core.has_work():
            elapsed = _timed_step_s(core)
            if shapes:
                out.append({"kind": "step", "shape": list(shapes[-1]), "measured_s": elapsed})
                shapes.clear()
    finally:
        del runner.run  # drop the instance attribute: the class method is back
    return out


def profile(model_dir: str | None = None, chunk_sizes=(16, 64, 128, 256, 512), batch_sizes=(1, 4, 16, 32),
            contexts=(32, 256), repeats: int = 3, threads: int | None = None, trace_reqs: int = 32) -> dict:
    """Time the real engine's steps (`MixedCore.step()`: scheduling, forward pass and
    sampling) on CPU; returns the calibration dict."""
    import torch

    from tetri import LLM
    from tetri.workers.executor import resolve_model_dir

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    model_dir = resolve_model_dir(model_dir)
    spec = _model_spec(model_dir)
    need_tokens = max(max(batch_sizes) * (max(contexts) + repeats + 20), 2 * max(chunk_sizes) + 16)
    # Caching off: the repeated prompts must be computed every time, that is what is measured.
    llm = LLM(model_dir, dtype="float32", num_blocks=need_tokens // 16 + 2 * max(batch_sizes) + 8,
              enable_prefix_caching=False)
    try:
        samples = _prefill_samples(llm.executor, spec, chunk_sizes, repeats)
        samples += _decode_samples(llm.executor, spec, batch_sizes, contexts, repeats)
        mixed_batches = sorted(b for b in set(batch_sizes) if b > 1)[-2:]
        mixed_chunks = sorted(set(chunk_sizes))[len(set(chunk_sizes)) // 2:][:2]
        samples += _mixed_samples(llm.executor, spec, mixed_batches, mixed_chunks, min(contexts), repeats)
        if trace_reqs:
            samples += _trace_samples(llm.executor, spec, trace_reqs, max(chunk_sizes))
    finally:
        llm.close()
        torch.set_num_threads(previous_threads)
    return {"version": 1, "model": dataclasses.asdict(spec), "model_dir": model_dir, "device": "cpu",
            "threads": used_threads, "repeats": repeats, "samples": samples}


def validate(calibration_path: str | Path, num_reqs: int = 48, chunk_tokens: int = 256, seed: int = 1,
             threads: int | None = 1) -> dict:
    """Real engine vs simulator on a fresh random workload (all arriving at 0): makespans."""
    import torch

    from tetri import LLM
    from tetri.bench.workload import Request
    from tetri.sim.calibrate import load_calibration
    from tetri.sim.config import SimConfig
    from tetri.sim.costmodel import CostModel
    from tetri.sim.simulator import simulate

    model, fit = load_calibration(calibration_path)
    data = json.loads(Path(calibration_path).read_text())
    rng = random.Random(seed)
    lens = [(rng.randint(16, min(400, model.max_model_len // 2)), rng.randint(8, 64)) for _ in range(num_reqs)]
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    llm = LLM(data.get("model_dir"), dtype="float32", chunk_size=chunk_tokens, enable_prefix_caching=False)
    try:
        for i, (p, o) in enumerate(lens):
            llm.core.add_request(f"v{i}", _ids(p, i, model.vocab), _params(o))
        start = time.perf_counter()
        real_steps = 0
        while llm.core.has_work():
            llm.core.step()
            real_steps += 1
        real_s = time.perf_counter() - start
    finally:
        llm.close()
        torch.set_num_threads(previous_threads)
    # The real mixed core runs a full chunk of prompt tokens besides its decodes.
    cfg = SimConfig(mode="colocated-chunked", num_gpus=1, chunk_size_tokens=chunk_tokens + num_reqs, seed=seed)
    sim = simulate([Request(p, o, 0.0) for p, o in lens], cfg, CostModel(model, fit.hardware))
    return {"requests": num_reqs, "real_s": real_s, "sim_s": sim.duration_s, "sim_over_real": sim.duration_s / real_s,
            "real_steps": real_steps, "sim_steps": sim.stats["steps"], "fit_error": fit.mean_abs_rel_error}
