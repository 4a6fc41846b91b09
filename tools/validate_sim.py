"""How well the calibrated simulator predicts the real server: mean TTFT and JCT, same workload.

1. `tetri-sim profile` times the real engine (embedded model, CPU) -> calibration JSON;
2. `tetri-serve` runs for real (colocated: 1 mixed worker; disagg: 1 prefill + 1 decode) and
   tetri-bench replays the workload against it;
3. `tetri-sim --calibration` simulates the same workload (same generator, seed, rate);
4. prints real vs simulated and the error.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--calibration", default=None, help="reuse a `tetri-sim profile` JSON")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tetri-validate-")
    calib = args.calibration or os.path.join(tmp, "calib.json")
    if not args.calibration:
        sim_main(["profile", "--out", calib])
    load = ["--workload", args.workload, "--rate", str(args.rate), "--num-requests", str(args.num_requests),
            "--length-scale", str(args.length_scale), "--max-prompt-tokens", "1024", "--max-output-tokens", "128",
            "--seed", "0"]
    print(f"{'mode':<10} {'metric':<10} {'real s':>9} {'sim s':>9} {'sim/real':>9}")
    for name, (serve_flags, sim_flags) in MODES.items():
        srv = ServerProc("--device", "cpu", "--chunk-size", str(args.chunk_size), *serve_flags).start()
        try:
            real_json = os.path.join(tmp, f"real-{name}.json")
            bench_main(["--base-url", srv.base_url, *load, "--vocab-size", "500", "--json", real_json, "--no-progress"])
        finally:
            srv.stop()
        sim_json = os.path.join(tmp, f"sim-{name}.json")
        sim_main([*sim_flags, *load, "--hardware", "cpu", "--model-preset", "tiny-default", "--calibration", calib,
                  "--chunk-size", str(args.chunk_size), "--json", sim_json])
        real, sim = (json.load(open(p)) for p in (real_json, sim_json))
        for metric, key in (("mean TTFT", "ttft_s"), ("mean JCT", "e2e_s")):
            r, s = real[key]["mean"], sim[key]["mean"]
            print(f"{name:<10} {metric:<10} {r:>9.4f} {s:>9.4f} {s / r:>8.2f}x")


if __name__ == "__main__":
    main()
