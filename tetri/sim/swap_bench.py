"""Issue 19 item 5's figures: KV swap against recompute preemption, simulated side by side.

    python -m tetri.sim.swap_bench [--host-link-gb-s 64,4]

One tetri cluster (1 prefill + 1 decode worker, Llama-3-8B on H200, MLFQ decode policy with
FastServe's one-step base quantum, `max_num_seqs` 4, 1500 KV blocks per worker, 64 GiB swap
space), 60 Poisson requests at 2 req/s, prompts 2000-4000 tokens, outputs 100-400: the decode
pool holds about six of them, so the MLFQ preempts. Each host-link bandwidth runs the three
preemption modes on the same requests; the table gives mean TTFT and JCT, p99 TPOT, goodput
(requests meeting TTFT 1 s and TPOT 50 ms per second) and the preemptions each mode made.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics

from tetri.bench.records import Slo
from tetri.bench.workload import Request
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import GB, HARDWARE_PRESETS, MODEL_PRESETS, CostModel
from tetri.sim.simulator import simulate

SLO = Slo(ttft_s=1.0, tpot_s=0.05)


def requests(n: int = 60, rate: float = 2.0, seed: int = 1) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(Request(rng.randint(2000, 4000), rng.randint(100, 400), t))
        t += rng.expovariate(rate)
    return out


def run(reqs: list[Request], mode: str, host_link_gb_s: float, check_invariants: bool = False) -> dict:
    hw = dataclasses.replace(HARDWARE_PRESETS["h200"], host_link_bytes_s=host_link_gb_s * GB)
    cfg = SimConfig(mode="tetri", num_gpus=2, num_prefill=1, decode_policy="mlfq", max_num_seqs=4, num_blocks=1500,
                    swap_space=64.0, preemption_mode=mode, check_invariants=check_invariants)
    result = simulate(reqs, cfg, CostModel(MODEL_PRESETS["llama3-8b"], hw))
    recs = [r for r in result.records if r.ok]
    tpots = sorted(t for r in recs if (t := r.tpot_s) is not None)
    duration_s = max(r.arrival_s + r.e2e_s for r in recs)
    return {"ok": len(recs) == len(reqs), "ttft_s": statistics.mean(r.ttft_s for r in recs),
            "jct_s": statistics.mean(r.e2e_s for r in recs), "tpot_p99_s": tpots[int(0.99 * (len(tpots) - 1))],
            "goodput": sum(SLO.met_by(r) for r in recs) / duration_s,
            "preemptions": result.stats["preemptions"], "swaps": result.stats.get("swaps", 0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host-link-gb-s", default="64,4", help="GPU-host bandwidths to compare, GB/s (default 64,4)")
    args = p.parse_args(argv)
    reqs = requests()
    print("| host link | preemption | TTFT mean (s) | JCT mean (s) | TPOT p99 (ms) | goodput (req/s) | preemptions | swapped |")
    print("|---|---|---|---|---|---|---|---|")
    for bw in (float(x) for x in args.host_link_gb_s.split(",")):
        for mode in ("recompute", "swap", "auto"):
            r = run(reqs, mode, bw)
            print(f"| {bw:g} GB/s | {mode} | {r['ttft_s']:.3f} | {r['jct_s']:.3f} | {1e3 * r['tpot_p99_s']:.1f} | "
                  f"{r['goodput']:.2f} | {r['preemptions']} | {r['swaps']} |")


if __name__ == "__main__":
    main()
