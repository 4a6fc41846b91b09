"""`tetri-sim`: simulate a cluster running tetri-serve's policies; report like tetri-bench.

Examples:
  tetri-sim --mode tetri --workload lphd --gpus 8 --prefill 2 --decode 6 --rate 200 \\
      --num-requests 2000 --slo ttft=1,tpot=0.05 --json out.json --plot-dir plots
  tetri-sim --mode colocated --trace azure_llm_2023/AzureLLMInferenceTrace_conv.csv --time-scale 20
  tetri-sim --mode colocated-chunked --workload mixed --sweep-rates 50,100,200 --slo ttft=1,tpot=0.05
  tetri-sim profile --out calib.json            (time the real engine on CPU)
  tetri-sim fit-serving --real live.json --mode disagg --gpus 2 --prefill 1 --decode 1 \\
      --workload mixed --rate 2 --calibration calib.json   (fit the live server's latencies)
  tetri-sim --mode tetri --gpus 2 --workload random --rate 5 --calibration calib.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from tetri.bench import workload
from tetri.bench.records import RequestRecord, Slo
from tetri.bench.report import max_rate_at, plot_latency_cdfs, plot_sweep, print_report, sweep_entry
from tetri.sched.chunking import PREFILL_POLICIES
from tetri.sched.decode_registry import DECODE_POLICIES
from tetri.sched.dispatch import DECODE_DISPATCH, PREFILL_DISPATCH
from tetri.sched.step_budget import STEP_BUDGET_MODES
from tetri.sim.config import MODES, SimConfig
from tetri.sim.costmodel import HARDWARE_PRESETS, MODEL_PRESETS, CostModel, lookup, with_overrides
from tetri.sim.simulator import sim_report, simulate
from tetri.bench.argtypes import positive_float as _positive_float, positive_int as _positive_int
from tetri.bench.argtypes import positive_floats as _floats, slo as _slo

ATTAINMENT_TARGET = 0.9
GB = 1e9


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Workload flags shared with tetri-plan (same meaning as tetri-bench's)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="Azure CSV, Mooncake JSONL or length-stats CSV")
    src.add_argument("--workload", choices=workload.WORKLOAD_NAMES, help="TetriInfer class, mixed or random")
    p.add_argument("--num-requests", type=_positive_int, default=500)
    p.add_argument("--length-scale", type=_positive_float, default=1.0)
    p.add_argument("--max-prompt-tokens", type=_positive_int)
    p.add_argument("--max-output-tokens", type=_positive_int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace-dir", help="shared traces folder (default: ../shared/traces)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Hardware/model/engine flags shared with tetri-plan."""
    p.add_argument("--gpus", type=_positive_int, default=8)
    p.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), help="default llama3-8b")
    p.add_argument("--hardware", choices=sorted(HARDWARE_PRESETS), help="default h200 (cpu with --calibration)")
    p.add_argument("--calibration", help="JSON from `tetri-sim profile` (and `fit-serving`): fit the cpu preset to it")
    p.add_argument("--link-gb-s", type=_positive_float, help="override the GPU-GPU KV link bandwidth (GB/s)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=256)
    p.add_argument("--max-batched-tokens", type=_positive_int, default=8192,
                   help="colocated (vLLM v0.2) prefill batch budget")
    p.add_argument("--block-size", type=_positive_int, default=16)
    p.add_argument("--num-blocks", type=_positive_int, help="KV blocks per worker (default: from memory)")
    p.add_argument("--max-sim-s", type=_positive_float, default=86400.0, help="stop after this much simulated time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetri-sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, required=True)
    add_workload_args(p)
    add_cluster_args(p)
    arrival = p.add_mutually_exclusive_group()
    arrival.add_argument("--rate", type=_positive_float, help="Poisson arrivals, req/s")
    arrival.add_argument("--time-scale", type=_positive_float, help="trace timestamps divided by this")
    p.add_argument("--sweep-rates", type=_floats, help="R1,R2,...: one run per Poisson rate (needs --slo)")
    p.add_argument("--prefill", type=_positive_int,
                   help="prefill workers (disagg/tetri; auto: those that start as prefill, the rest mixed)")
    p.add_argument("--decode", type=_positive_int,
                   help="decode workers (disagg/tetri; auto: those that start as decode)")
    p.add_argument("--chunk-size", type=_positive_int, default=512)
    p.add_argument("--prefill-policy", choices=PREFILL_POLICIES, default="fcfs")
    p.add_argument("--prefill-dispatch", choices=PREFILL_DISPATCH, default="least-loaded")
    p.add_argument("--decode-dispatch", choices=DECODE_DISPATCH, help="default: disagg round-robin, tetri tetri")
    p.add_argument("--decode-policy", choices=DECODE_POLICIES, help="default: tetri reserve-dynamic, else greedy")
    p.add_argument("--predictor", choices=("none", "oracle"), help="default: tetri oracle, else none")
    p.add_argument("--predictor-accuracy", type=float, default=1.0,
                   help="probability the predicted bucket is right (else +-1 bucket); 0.75 ~ the paper's")
    p.add_argument("--predictor-confusion", metavar="CV_JSON",
                   help="`tetri-predictor cv` report: draw predicted buckets from its measured confusion matrix "
                        "(and use its bucket width)")
    p.add_argument("--flip", action="store_true", help="let idle prefill/decode workers flip roles")
    p.add_argument("--slo", type=_slo, help="ttft=SECONDS,tpot=SECONDS")
    p.add_argument("--json", dest="json_path", help="write the JSON report here")
    p.add_argument("--plot-dir", help="write PNG plots here")
    p.add_argument("--check-invariants", action="store_true", help="check KV block invariants every step")
    p.add_argument("--prefix-caching", action="store_true",
                   help="prefill workers cache prompt blocks; hits from the trace's hash_ids (Mooncake)")
    p.add_argument("--kv-offloading-size", type=float, default=0.0,
                   help="GiB of host memory per worker for a host tier of the prefix cache (as tetri-serve's "
                        "flag): evicted cached blocks move there, hits upload them over PCIe (default 0: off)")
    p.add_argument("--swap-space", type=float, default=0.0,
                   help="GiB of host memory per decode worker for preempted requests' KV, swapped out and back "
                        "in over PCIe instead of recomputed (as tetri-serve's flag; default 0: off)")
    p.add_argument("--preemption-mode", default="auto", choices=("auto", "swap", "recompute"))
    p.add_argument("--step-budget", choices=STEP_BUDGET_MODES,
                   help="mixed steps' prompt-token budget: slo fits it to --slo's TPOT (tetri.sched.step_budget), "
                        "fixed is --chunk-size (default: slo for --mode auto, fixed otherwise)")
    return p


def cost_model_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, serving: bool = True) -> CostModel:
    """`serving=False`: a calibration's bare engine, without the live-server latencies it holds."""
    if args.calibration:
        from tetri.sim.calibrate import load_calibration

        if args.hardware not in (None, "cpu"):
            parser.error("--calibration fits the cpu preset; drop --hardware or use --hardware cpu")
        model, fit = load_calibration(args.calibration, mode=getattr(args, "mode", None) if serving else None)
        hw = fit.hardware
        if args.model_preset:
            model = MODEL_PRESETS[args.model_preset]
    else:
        model = lookup(MODEL_PRESETS, args.model_preset or "llama3-8b", "model preset")
        hw = lookup(HARDWARE_PRESETS, args.hardware or "h200", "hardware")
    hw = with_overrides(hw, link_bytes_s=args.link_gb_s * GB if args.link_gb_s else None)
    return CostModel(model, hw)


def _confusion(path: str | None) -> dict:
    if not path:
        return {}
    report = json.loads(Path(path).read_text())
    return {"predictor_confusion": tuple(tuple(int(c) for c in row) for row in report["confusion"]),
            "bucket_tokens": int(report["bucket_tokens"])}


def _declared_tpot(args: argparse.Namespace) -> float | None:
    """Mode auto paces decodes against the declared TPOT SLO (`--slo`), as tetri-serve would."""
    slo = getattr(args, "slo", None)
    if args.mode != "auto" or slo is None or slo.tpot_s == float("inf"):
        return None
    return slo.tpot_s


def _step_budget(args: argparse.Namespace) -> dict:
    """--step-budget and the TPOT it fits mixed steps to (--slo's; none: a fixed budget)."""
    slo = getattr(args, "slo", None)
    tpot_s = None if slo is None or slo.tpot_s == float("inf") else slo.tpot_s
    return {"step_budget": getattr(args, "step_budget", None), "step_tpot_s": tpot_s}


def sim_config(args: argparse.Namespace, **changes) -> SimConfig:
    fields = dict(
        mode=args.mode, num_gpus=args.gpus, num_prefill=args.prefill, num_decode=args.decode,
        chunk_size_tokens=args.chunk_size, max_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_num_seqs, block_size=args.block_size, num_blocks=args.num_blocks,
        prefill_policy=args.prefill_policy, prefill_dispatch=args.prefill_dispatch,
        decode_dispatch=args.decode_dispatch, decode_policy=args.decode_policy, predictor=args.predictor,
        predictor_accuracy=args.predictor_accuracy, flip=args.flip, seed=args.seed, max_sim_s=args.max_sim_s,
        check_invariants=args.check_invariants, prefix_caching=args.prefix_caching,
        role_tpot_s=_declared_tpot(args), kv_offloading_size=getattr(args, "kv_offloading_size", 0.0),
        swap_space=getattr(args, "swap_space", 0.0), preemption_mode=getattr(args, "preemption_mode", "auto"),
        **_confusion(getattr(args, "predictor_confusion", None)), **_step_budget(args))
    fields.update(changes)
    return SimConfig(**fields)


def build_requests(args: argparse.Namespace, rate: float | None, time_scale: float | None = None):
    return workload.build_workload(
        trace=args.trace, workload=args.workload, num_requests=args.num_requests, rate=rate,
        time_scale=time_scale, length_scale=args.length_scale, max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens, seed=args.seed,
        traces_dir=Path(args.trace_dir) if args.trace_dir else None)


def _run_config(args: argparse.Namespace, cost: CostModel, rate: float | None, num_sent: int) -> dict[str, Any]:
    return {"simulated": True, "trace": args.trace, "workload": args.workload, "num_requests": args.num_requests,
            "num_sent": num_sent, "rate": rate, "time_scale": args.time_scale, "length_scale": args.length_scale,
            "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens,
            "slo": args.slo.to_dict() if args.slo else None, "seed": args.seed,
            "model_preset": cost.model.name, "hardware": cost.hw.name, "calibration": args.calibration,
            "hardware_spec": dataclasses.asdict(cost.hw)}


def run_once(args, cost: CostModel, cfg: SimConfig, rate: float | None) -> tuple[dict, list[RequestRecord]]:
    reqs = build_requests(args, rate, args.time_scale)
    result = simulate(reqs, cfg, cost)
    return sim_report(result, args.slo, _run_config(args, cost, rate, len(reqs))), result.records


def _run(args, cost: CostModel, cfg: SimConfig) -> tuple[dict[str, Any], dict[str, list[RequestRecord]]]:
    if not args.sweep_rates:
        report, records = run_once(args, cost, cfg, args.rate)
        return report, {args.mode: records}
    runs, reports, sweep = {}, {}, []
    for rate in args.sweep_rates:
        reports[rate], runs[f"{rate:g} req/s"] = run_once(args, cost, cfg, rate)
        sweep.append(sweep_entry(rate, reports[rate]))
    best = max_rate_at(sweep, ATTAINMENT_TARGET)
    report = dict(reports[best if best is not None else min(args.sweep_rates)])
    report["sweep"] = sweep
    report["max_rate_at_90"] = best
    report["config"] = {**report["config"], "sweep_rates": args.sweep_rates}
    return report, runs


def write_outputs(report: dict, runs: dict, json_path: str | None, plot_dir: str | None, slo: Slo | None) -> None:
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if plot_dir:
        plot_latency_cdfs(runs, Path(plot_dir) / "latency_cdf.png", slo)
        if report.get("sweep"):
            plot_sweep(report["sweep"], Path(plot_dir) / "slo_attainment_vs_rate.png", ATTAINMENT_TARGET)


def fit_serving_main(argv: Sequence[str]) -> int:
    """`tetri-sim fit-serving`: fit the live server's latencies for one mode (see serving_fit)."""
    from tetri.sim.serving_fit import fit_serving

    parser = build_parser()
    parser.prog = "tetri-sim fit-serving"
    parser.add_argument("--real", required=True, help="tetri-bench JSON of a live run of this workload")
    parser.add_argument("--out", help="calibration JSON to write (default: update --calibration)")
    args = parser.parse_args(argv)
    if not args.calibration:
        parser.error("fit-serving needs --calibration (a `tetri-sim profile` JSON)")
    try:
        real = json.loads(Path(args.real).read_text())
        data = json.loads(Path(args.calibration).read_text())
        cost = cost_model_from_args(args, parser, serving=False)
        fit = fit_serving(build_requests(args, args.rate, args.time_scale), sim_config(args), cost, real)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"tetri-sim: error: {exc}", file=sys.stderr)
        return 2
    data.setdefault("serving", {})[args.mode] = {**fit.to_dict(), "fitted_on": args.real}
    out = Path(args.out or args.calibration)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{args.mode}: request latency {fit.request_latency_s * 1e3:.2f} ms, step latency "
          f"{fit.step_latency_s * 1e3:.3f} ms (mean TTFT {fit.sim_ttft_s * 1e3:.2f} vs live "
          f"{fit.real_ttft_s * 1e3:.2f} ms, mean TPOT {fit.sim_tpot_s * 1e3:.3f} vs {fit.real_tpot_s * 1e3:.3f} ms); "
          f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "profile":
        from tetri.sim.profile_cli import profile_main

        return profile_main(argv[1:])
    if argv and argv[0] == "fit-serving":
        return fit_serving_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep_rates and not args.slo:
        parser.error("--sweep-rates needs --slo")
    if args.sweep_rates and (args.rate or args.time_scale):
        parser.error("--sweep-rates sets the rate itself; drop --rate/--time-scale")
    try:
        cost = cost_model_from_args(args, parser)
        cfg = sim_config(args)
        report, runs = _run(args, cost, cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tetri-sim: error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    failed = [r for recs in runs.values() for r in recs if not r.ok]
    if failed:
        print(f"{len(failed)} request(s) failed; first error: {failed[0].error}", file=sys.stderr)
    write_outputs(report, runs, args.json_path, args.plot_dir, args.slo)
    return 0 if report["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
