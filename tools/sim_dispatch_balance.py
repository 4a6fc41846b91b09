"""How evenly a simulated run spread requests over its decode workers (RESULTS.md finding 3).

Takes `tetri-sim`'s own flags, runs the simulation once, and prints per decode worker: the
requests dispatched to it, how many of them were predicted heavy, and the peak number
resident at once (handed off and not yet finished, exact from the requests' handoff and
finish times); the spread of the heavy share across workers (`heavy_share_spread`); then
the run's p99 TPOT, mean TTFT / JCT, SLO attainment and goodput.

    python tools/sim_dispatch_balance.py --mode tetri --workload mixed --num-requests 4000 --rate 100 \\
        --gpus 8 --prefill 5 --decode 3 --model-preset llama3-8b --hardware h200 \\
        --slo ttft=1,tpot=0.05 --seed 0 --chunk-size 512 --predictor-accuracy 0.75 [--decode-dispatch least-loaded]

`--summary-json PATH` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from tetri.sched.dispatch import is_heavy
from tetri.sim.cli import build_parser, build_requests, cost_model_from_args, sim_config
from tetri.sim.simulator import sim_report, simulate


def peak_resident(intervals: list[tuple[float, float]]) -> int:
    """Most intervals [start, end) open at once (an end at t closes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    peak = now = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def heavy_share_spread(result, heavy_decode_tokens: int) -> float:
    """Mean, over the handoffs, of (max - min) across decode workers of the predicted-heavy
    share of the requests resident there (right after each handoff; workers holding none
    are left out of that sample)."""
    events = []
    for req in result.requests:
        if req.decode_worker is not None and req.done_s is not None:
            h = int(is_heavy(req.info, heavy_decode_tokens))
            events += [(req.handoff_s, 1, req.decode_worker, h), (req.done_s, 0, req.decode_worker, h)]
    events.sort(key=lambda e: (e[0], e[1]))
    resident: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    samples = []
    for _t, start, wid, h in events:
        delta = 1 if start else -1
        resident[wid][0] += delta
        resident[wid][1] += delta * h
        if start:
            shares = [hv / n for n, hv in resident.values() if n > 0]
            samples.append(max(shares) - min(shares))
    return sum(samples) / len(samples) if samples else 0.0


def balance(result, heavy_decode_tokens: int) -> dict:
    """Per decode worker: requests, predicted-heavy requests, peak resident."""
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    heavy: dict[int, int] = defaultdict(int)
    for req in result.requests:
        if req.decode_worker is None or req.done_s is None:
            continue
        spans[req.decode_worker].append((req.handoff_s, req.done_s))
        heavy[req.decode_worker] += is_heavy(req.info, heavy_decode_tokens)
    return {str(w): {"requests": len(spans[w]), "heavy": heavy[w], "peak_resident": peak_resident(spans[w])}
            for w in sorted(spans)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "sim_dispatch_balance"
    parser.add_argument("--summary-json", help="write the summary here too")
    args = parser.parse_args(argv)
    cost = cost_model_from_args(args, parser)
    cfg = sim_config(args)
    result = simulate(build_requests(args, args.rate, args.time_scale), cfg, cost)
    report = sim_report(result, args.slo, {})
    workers = balance(result, result.config.heavy_decode_tokens)
    summary = {"decode_dispatch": result.config.decode_dispatch, "workers": workers,
               "heavy_share_spread": heavy_share_spread(result, result.config.heavy_decode_tokens),
               "tpot_p99_ms": report["tpot_s"]["p99"] * 1e3, "ttft_mean_s": report["ttft_s"]["mean"],
               "jct_mean_s": report["e2e_s"]["mean"], "slo_attainment": report.get("slo_attainment"),
               "goodput": report.get("goodput")}
    print(f"decode dispatch {summary['decode_dispatch']}")
    for wid, row in workers.items():
        print(f"  worker {wid}: {row['requests']} requests ({row['heavy']} predicted heavy), "
              f"peak {row['peak_resident']} resident")
    print(f"resident heavy-share spread across workers (mean over handoffs): {summary['heavy_share_spread']:.3f}")
    print(f"p99 TPOT {summary['tpot_p99_ms']:.1f} ms, mean TTFT {summary['ttft_mean_s']:.3f} s, "
          f"mean JCT {summary['jct_mean_s']:.2f} s, SLO attainment {summary['slo_attainment']}, "
          f"goodput {summary['goodput']}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
