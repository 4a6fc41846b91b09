"""`tetri-sim profile`: time the real engine on CPU and write a calibration JSON.

    tetri-sim profile --out calib.json [--model DIR] [--chunk-sizes 16 64 128 256 512]
        [--batch-sizes 1 4 16 32] [--contexts 32 256] [--repeats 5] [--threads 1]
        [--trace-requests 32] [--validate 48]

Then `tetri-sim --calibration calib.json ...` fits the `cpu` hardware preset to it (see
`tetri.sim.calibrate`). The JSON also records the fit, for a quick look.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from tetri.sim.calibrate import PARAM_NAMES, fit_hardware, sample_from_dict
from tetri.sim.profiling import profile, validate
from tetri.sim.costmodel import HARDWARE_PRESETS, ModelSpec, StepShape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetri-sim profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--model", help="Hugging Face model dir (default: the embedded default model)")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[32, 256], help="decode context per request")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median kept)")
    p.add_argument("--trace-requests", type=int, default=32,
                   help="also time every step of a random workload of this many requests (0: skip)")
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="then run N random requests on the real engine and in the simulator; compare")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: extra threads spin-wait on a shared, busy host)")
    return p


def describe(sample: dict) -> str:
    if sample["kind"] == "step":
        return "real-run step " + ", ".join(f"{k}={v}" for k, v in zip(StepShape._fields, sample["shape"]) if v)
    parts = []
    if sample["kind"] in ("prefill", "mixed"):
        pieces = sample.get("pieces", 1)
        parts.append(f"prefill {sample['new_tokens']} tokens after {sample['start_tokens']}"
                     + (f" in {pieces} pieces" if pieces > 1 else ""))
    if sample["kind"] in ("decode", "mixed"):
        parts.append(f"decode {sample['batch_reqs']} x context {sample['context_tokens']}")
    return " + ".join(parts)


def fit_summary(data: dict) -> dict:
    model = ModelSpec(**data["model"])
    fit = fit_hardware([sample_from_dict(d) for d in data["samples"]], model, HARDWARE_PRESETS["cpu"])
    keys = ("prefill_compute_eff", "decode_compute_eff", "memory_eff", "prefill_overhead_s", "decode_overhead_s",
            "piece_overhead_s")
    hw = dataclasses.asdict(fit.hardware)
    return {"mean_abs_rel_error": fit.mean_abs_rel_error, "rounds": fit.rounds, "params": list(PARAM_NAMES),
            **{k: hw[k] for k in keys}}


def profile_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.chunk_sizes + args.batch_sizes + args.contexts) < 1 or args.repeats < 1:
        print("tetri-sim profile: sizes and repeats must be >= 1", file=sys.stderr)
        return 2
    data = profile(args.model, tuple(args.chunk_sizes), tuple(args.batch_sizes), tuple(args.contexts),
                   args.repeats, args.threads, args.trace_requests)
    data["fit"] = fit_summary(data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    for s in data["samples"]:
        if s["kind"] != "step":
            print(f"{describe(s):<56} {s['measured_s'] * 1000:8.2f} ms")
    steps = [s["measured_s"] for s in data["samples"] if s["kind"] == "step"]
    if steps:
        print(f"{len(steps)} steps of a real run: {sum(steps) * 1000:.1f} ms in all")
    fit = data["fit"]
    print(f"fit: mean |rel error| {fit['mean_abs_rel_error']:.1%}; prefill eff {fit['prefill_compute_eff']:.3g}, "
          f"decode eff {fit['decode_compute_eff']:.3g}, memory eff {fit['memory_eff']:.3g}, overheads "
          f"{fit['prefill_overhead_s'] * 1000:.2f} / {fit['decode_overhead_s'] * 1000:.2f} ms, per piece "
          f"{fit['piece_overhead_s'] * 1000:.3f} ms")
    print(f"wrote {out}")
    if args.validate:
        check = validate(out, args.validate, threads=args.threads)
        print(f"validation, {check['requests']} requests at once: real engine {check['real_s']:.3f} s in "
              f"{check['real_steps']} steps, simulated {check['sim_s']:.3f} s in {check['sim_steps']} steps "
              f"(sim/real {check['sim_over_real']:.2f})")
    return 0
