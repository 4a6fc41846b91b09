"""A calibration of the served model for `tetri-serve --mode auto`'s plan, measured live on this host.

tetri-plan with the `cpu` preset and `llama-100m` describes neither the served model nor this
host: for the ~11M model of tools/compare_modes.py it says no candidate meets the SLO at any
rate, and falls back to colocated. A profile of the served model's bare engine
(`tetri-sim profile`) fixes the model but not the host: it predicts colocated and disagg alike
(mean JCT about 0.5 s at 1.5 req/s on the compare workload) while the live server gives about
1.35 s and 1.0 s, because on a shared CPU host two mixed workers' prompt chunks slow each
other's steps and a prefill + decode pair much less. So this also runs the live server in
both deployments tetri-plan chooses between (2 mixed; 1 prefill + 1 decode) on a *fitting*
workload (its own seed, not the compared one) and stores `tetri-sim fit-serving`'s per-mode
latencies in the same JSON; tetri-plan then simulates each candidate with its own mode's fit
(`tetri.sim.plan.mode_costs_from_args`).

    python tools/calibrate_served.py --model DIR --out calib.json [--workload mixed --rate 1.5 --seed 1]
    tetri-serve --mode auto --workers 2 --model DIR --plan-flags "--calibration calib.json ..."
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.runtime.server_proc import ServerProc  # noqa: E402
from tetri.bench.cli import main as bench_main  # noqa: E402
from tetri.sim.cli import main as sim_main  # noqa: E402

DEPLOYMENTS = {  # fit-serving mode: (tetri-serve flags, tetri-sim flags)
    "colocated-chunked": (["--mode", "colocated", "--workers", "2"], ["--mode", "colocated-chunked", "--gpus", "2"]),
    "disagg": (["--mode", "disagg", "--prefill", "1", "--decode", "1"],
               ["--mode", "disagg", "--gpus", "2", "--prefill", "1", "--decode", "1"]),
}


def calibrate(model: str, out: str, load: list[str], chunk_size: int) -> None:
    """Profile `model`'s engine into `out`, then fit each deployment's serving latencies to a
    live tetri-bench run of `load` (tetri-bench workload flags) and store them in `out`."""
    sim_main(["profile", "--model", model, "--out", out, "--repeats", "3", "--trace-requests", "16"])
    tmp = tempfile.mkdtemp(prefix="tetri-calib-")
    for mode, (serve_flags, sim_flags) in DEPLOYMENTS.items():
        real = os.path.join(tmp, f"{mode}.json")
        srv = ServerProc("--device", "cpu", "--model", model, "--chunk-size", str(chunk_size), *serve_flags).start()
        try:
            bench_main(["--base-url", srv.base_url, *load, "--vocab-size", "500", "--json", real, "--no-progress"])
        finally:
            srv.stop()
        sim_main(["fit-serving", *sim_flags, "--chunk-size", str(chunk_size), *load, "--calibration", out,
                  "--real", real])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--rate", type=float, default=1.5)
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1, help="the fitting workload's seed (not the compared one's)")
    args = ap.parse_args()
    load = ["--workload", args.workload, "--rate", str(args.rate), "--num-requests", str(args.num_requests),
            "--length-scale", str(args.length_scale), "--max-prompt-tokens", "1024", "--max-output-tokens", "128",
            "--seed", str(args.seed)]
    calibrate(args.model, args.out, load, args.chunk_size)


if __name__ == "__main__":
    main()
