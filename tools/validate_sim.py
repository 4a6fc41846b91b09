"""How well the calibrated simulator predicts the real server: mean TTFT and JCT, same workload.

1. `tetri-sim profile` times the real engine (embedded model, CPU) -> calibration JSON;
2. per mode (colocated: 1 mixed worker; disagg: 1 prefill + 1 decode), `tetri-serve` runs
   for real and tetri-bench replays two workloads against it: a fitting run (seed
   `--fit-seed`) and the held-out validation run (seed `--seed`, same generator);
3. `tetri-sim fit-serving` fits the live server's request and step latencies to the fitting
   run only;
4. `tetri-sim --calibration` simulates the validation workload, with the bare engine's cost
   model and with the fitted serving latencies, and the script prints both against the live
   run.

    python tools/validate_sim.py [--workload mixed --rate 2 --num-requests 60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.runtime.server_proc import ServerProc  # noqa: E402
from tetri.bench.cli import main as bench_main  # noqa: E402
from tetri.sim.cli import main as sim_main  # noqa: E402

MODES = {  # name: (tetri-serve flags, tetri-sim flags)
    "colocated": (["--mode", "colocated", "--workers", "1"], ["--mode", "colocated-chunked", "--gpus", "1"]),
    "disagg": (["--prefill", "1", "--decode", "1"], ["--mode", "disagg", "--gpus", "2", "--prefill", "1", "--decode", "1"]),
}


def _load(args, seed: int, rate: float) -> list[str]:
    return ["--workload", args.workload, "--rate", str(rate), "--num-requests", str(args.num_requests),
            "--length-scale", str(args.length_scale), "--max-prompt-tokens", "1024", "--max-output-tokens", "128",
            "--seed", str(seed)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="the validation workload's seed")
    ap.add_argument("--fit-seed", type=int, default=1, help="the fitting workload's seed")
    ap.add_argument("--fit-rate", type=float, help="the fitting workload's rate (default --rate)")
    ap.add_argument("--calibration", default=None, help="reuse a `tetri-sim profile` JSON")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tetri-validate-")
    engine_calib = args.calibration or os.path.join(tmp, "engine.json")
    if not args.calibration:
        sim_main(["profile", "--out", engine_calib])
    fit_load = _load(args, args.fit_seed, args.fit_rate or args.rate)
    load = _load(args, args.seed, args.rate)
    rows = []
    for name, (serve_flags, sim_flags) in MODES.items():
        srv = ServerProc("--device", "cpu", "--chunk-size", str(args.chunk_size), *serve_flags).start()
        real_json = {kind: os.path.join(tmp, f"real-{name}-{kind}.json") for kind in ("fit", "check")}
        try:
            for kind, workload in (("fit", fit_load), ("check", load)):
                bench_main(["--base-url", srv.base_url, *workload, "--vocab-size", "500", "--json", real_json[kind],
                            "--no-progress"])
        finally:
            srv.stop()
        sim = [*sim_flags, "--hardware", "cpu", "--model-preset", "tiny-default", "--chunk-size", str(args.chunk_size)]
        served_calib = os.path.join(tmp, f"served-{name}.json")
        sim_main(["fit-serving", *sim, *fit_load, "--calibration", engine_calib, "--real", real_json["fit"],
                  "--out", served_calib])
        sims = {}
        for kind, path in (("engine only", engine_calib), ("+ serving fit", served_calib)):
            out = os.path.join(tmp, f"sim-{name}-{kind[0]}.json")
            sim_main([*sim, *load, "--calibration", path, "--json", out])
            sims[kind] = json.load(open(out))
        real = json.load(open(real_json["check"]))
        for metric, key in (("mean TTFT", "ttft_s"), ("mean JCT", "e2e_s")):
            r = real[key]["mean"]
            rows.append((name, metric, r, *(sims[k][key]["mean"] for k in sims)))
    print(f"\nvalidation workload: {args.workload}, seed {args.seed}, {args.rate:g} req/s, {args.num_requests} requests, "
          f"length scale {args.length_scale:g} (serving latencies fitted on seed {args.fit_seed})")
    print(f"{'mode':<10} {'metric':<10} {'real ms':>9} {'engine-only sim':>16} {'ratio':>6} {'fitted sim':>11} {'ratio':>6}")
    for name, metric, r, bare, fitted in rows:
        print(f"{name:<10} {metric:<10} {r * 1e3:>9.2f} {bare * 1e3:>16.2f} {bare / r:>5.2f}x "
              f"{fitted * 1e3:>11.2f} {fitted / r:>5.2f}x")


if __name__ == "__main__":
    main()
