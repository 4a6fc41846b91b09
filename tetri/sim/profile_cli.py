"""`tetri-sim profile`: time the real engine on CPU and write a calibration JSON.

    tetri-sim profile --out calib.json [--model DIR] [--chunk-sizes 16 64 256 512]
        [--batch-sizes 1 4 16 32] [--contexts 32 256] [--repeats 5] [--threads 1]

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

from tetri.sim.calibrate import PARAM_NAMES, fit_hardware, profile, sample_from_dict
from tetri.sim.costmodel import HARDWARE_PRESETS, ModelSpec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetri-sim profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--model", help="Hugging Face model dir (default: the embedded default model)")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[32, 256], help="decode context per request")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (median kept)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: extra threads spin-wait on a shared, busy host)")
    return p


def fit_summary(data: dict) -> dict:
    model = ModelSpec(**data["model"])
    fit = fit_hardware([sample_from_dict(d) for d in data["samples"]], model, HARDWARE_PRESETS["cpu"])
    keys = ("prefill_compute_eff", "decode_compute_eff", "memory_eff", "prefill_overhead_s", "decode_overhead_s")
    hw = dataclasses.asdict(fit.hardware)
    return {"mean_abs_rel_error": fit.mean_abs_rel_error, "rounds": fit.rounds, "params": list(PARAM_NAMES),
            **{k: hw[k] for k in keys}}


def profile_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.chunk_sizes + args.batch_sizes + args.contexts) < 1 or args.repeats < 1:
        print("tetri-sim profile: sizes and repeats must be >= 1", file=sys.stderr)
        return 2
    data = profile(args.model, tuple(args.chunk_sizes), tuple(args.batch_sizes), tuple(args.contexts),
                   args.repeats, args.threads)
    data["fit"] = fit_summary(data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    for s in data["samples"]:
        shape = (f"prefill {s['new_tokens']} tokens after {s['start_tokens']}" if s["kind"] == "prefill"
                 else f"decode batch {s['batch_reqs']} x context {s['context_tokens']}")
        print(f"{shape:<40} {s['measured_s'] * 1000:8.2f} ms")
    fit = data["fit"]
    print(f"fit: mean |rel error| {fit['mean_abs_rel_error']:.1%}; prefill eff {fit['prefill_compute_eff']:.3g}, "
          f"decode eff {fit['decode_compute_eff']:.3g}, memory eff {fit['memory_eff']:.3g}, overheads "
          f"{fit['prefill_overhead_s'] * 1000:.2f} / {fit['decode_overhead_s'] * 1000:.2f} ms")
    print(f"wrote {out}")
    return 0
