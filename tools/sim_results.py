"""Issue 19's headline tables (items 3 and 4): every mode side by side at two TPOT SLOs.

Simulated 8 x H200, Llama-3-8B (`tetri-sim`): the TetriInfer classes, the mixed workload and
the Azure conversation trace at three loads each; per run TTFT mean and p99, TPOT p99, mean
JCT, and goodput (requests/s meeting TTFT <= 1 s AND TPOT <= the SLO, DistServe-style) at
TPOT 50 ms and at 25 ms. One simulation per (workload, load, mode): the SLO judges the
records, it does not change the run, so both goodputs come from the same run. The last
columns compare each mode's goodput with the better of `colocated-chunked` and `disagg`.
`auto@X` starts from tetri-plan's choice for the SLO X (`plan_start`: plan's search, run once
per workload and SLO in this script's run and cached; all mixed when plan picks colocated).

    nice -n 10 python tools/sim_results.py [--num-requests 2000] [--workloads mixed azure] \\
        [--modes colocated colocated-chunked disagg tetri auto] [--write tetri/sim/RESULTS.md]

Prints the section; `--write FILE` replaces it in FILE between the markers below (appended
when absent). `--json FILE` keeps every row's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tetri.bench.records import Slo

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- sim-results:begin (tools/sim_results.py) -->"
END = "<!-- sim-results:end -->"
SLOS = (("50 ms", Slo(ttft_s=1.0, tpot_s=0.05)), ("25 ms", Slo(ttft_s=1.0, tpot_s=0.025)))
COMMON = "--gpus 8 --model-preset llama3-8b --hardware h200 --seed 0 --chunk-size 512"
AZURE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
MODES = ("colocated", "colocated-chunked", "disagg", "tetri", "auto")
BASELINES = ("colocated-chunked", "disagg")
_REQUESTS: dict[tuple, list] = {}
PLAN_MAX_SIMS = 48
"""tetri-plan's cap on simulated runs per (workload, SLO) when it picks auto's start: a count,
not seconds, so the pick (and the table) does not depend on how loaded the machine is."""
PLAN_FLAGS = ""
"""Further tetri-plan flags (the tests shrink its runs with --max-requests/--window-s)."""
_PLAN: dict[tuple, tuple[int, int] | None] = {}
"""tetri-plan's choice per (workload flags, cluster flags, SLO), computed once per script run."""


@dataclass(frozen=True)
class Workload:
    name: str
    flags: str
    """tetri-sim workload flags, without --rate/--time-scale/--num-requests."""
    split: tuple[int, int]
    """prefill:decode of disagg and tetri (RESULTS.md's split sweep); auto starts from tetri-plan's pick."""
    loads: tuple[tuple[str, str], ...]
    """(label, the load flag) per load."""
    request_factor: float = 1.0


WORKLOADS = (
    Workload("lpld", "--workload lpld", (6, 2), tuple((f"{r} req/s", f"--rate {r}") for r in (300, 500, 700)), 1.5),
    Workload("lphd", "--workload lphd", (2, 6), tuple((f"{r} req/s", f"--rate {r}") for r in (200, 300, 400))),
    Workload("hpld", "--workload hpld", (7, 1), tuple((f"{r} req/s", f"--rate {r}") for r in (40, 70, 95))),
    Workload("hphd", "--workload hphd", (4, 4), tuple((f"{r} req/s", f"--rate {r}") for r in (30, 50, 70))),
    Workload("mixed", "--workload mixed", (5, 3), tuple((f"{r} req/s", f"--rate {r}") for r in (60, 100, 140))),
    Workload("azure", f"--trace {AZURE}", (5, 3),
             tuple((f"time-scale {t}", f"--time-scale {t}") for t in (15, 25, 35))),
)


def row_modes(modes: list[str]) -> list[str]:
    """The table's rows: `auto` once per SLO, each run declaring that SLO (`auto@25 ms`)."""
    return [m for mode in modes for m in ([f"auto@{label}" for label, _ in SLOS] if mode == "auto" else [mode])]


def run_flags(wl: Workload, load_flag: str, mode: str, num_requests: int, common: str = COMMON) -> list[str]:
    """tetri-sim's flags for one row (the command printed under the table)."""
    base, _, slo_label = mode.partition("@")
    flags = [*wl.flags.split(), *load_flag.split(), "--num-requests", str(int(num_requests * wl.request_factor)),
             *common.split(), "--mode", base]
    start = plan_start(wl, dict(SLOS)[slo_label], common) if base == "auto" else wl.split
    if base in ("disagg", "tetri") or (base == "auto" and start is not None):
        flags += ["--prefill", str(start[0]), "--decode", str(start[1])]
    if base in ("tetri", "auto"):
        flags += ["--predictor-accuracy", "0.75"]
    if slo_label:
        slo = dict(SLOS)[slo_label]
        flags += ["--slo", f"ttft={slo.ttft_s:g},tpot={slo.tpot_s:g}"]
    return flags


def plan_start(wl: Workload, slo: Slo, common: str = COMMON) -> tuple[int, int] | None:
    """auto's starting deployment: tetri-plan's pick for `slo` ((prefill, decode) workers of its
    best tetri split, or None when colocated-chunked wins: every worker starts mixed). Run once
    per (workload, cluster, SLO) and cached: plan's own search (tetri.sim.plan.run_search, Poisson
    arrivals of the workload's lengths, highest rate at 90% attainment), narrowed to its stage-1
    candidates at this script's chunk size and auto's decode policy (colocated-chunked and every
    split) and to PLAN_MAX_SIMS simulated runs."""
    key = (wl.flags, common, slo)
    if key not in _PLAN:
        from tetri.sim.plan import build_parser, plan_search

        flags = [*wl.flags.split(), *_cluster_flags(common), "--slo", f"ttft={slo.ttft_s:g},tpot={slo.tpot_s:g}",
                 "--max-sims", str(PLAN_MAX_SIMS), *PLAN_FLAGS.split()]
        args = build_parser().parse_args(flags)
        chunk = int(common.split()[common.split().index("--chunk-size") + 1])
        best = plan_search(args, build_parser(), slo, [chunk], ["reserve-dynamic"]).best()
        c = best.candidate if best is not None else None
        _PLAN[key] = (c.num_prefill, c.num_decode) if c is not None and c.mode == "tetri" else None
    return _PLAN[key]


def _cluster_flags(common: str) -> list[str]:
    """`common` without --chunk-size (tetri-plan takes --chunk-sizes)."""
    words = common.split()
    if "--chunk-size" in words:
        i = words.index("--chunk-size")
        words = words[:i] + words[i + 2:]
    return words


def simulate_row(flags: list[str]) -> dict:
    """One simulation; its figures at every SLO of `SLOS`."""
    from tetri.sim.cli import build_parser, build_requests, cost_model_from_args, sim_config
    from tetri.sim.simulator import sim_report, simulate

    parser = build_parser()
    args = parser.parse_args(flags)
    key = (args.trace, args.workload, args.num_requests, args.rate, args.time_scale, args.seed)
    if key not in _REQUESTS:  # the same requests for every mode of a row group (built once)
        _REQUESTS.clear()
        _REQUESTS[key] = build_requests(args, args.rate, args.time_scale)
    result = simulate(_REQUESTS[key], sim_config(args), cost_model_from_args(args, parser))
    first = sim_report(result, SLOS[0][1])
    row = {"ttft_mean_s": first["ttft_s"]["mean"], "ttft_p99_s": first["ttft_s"]["p99"],
           "tpot_p99_s": first["tpot_s"]["p99"], "jct_mean_s": first["e2e_s"]["mean"],
           "failed": first["failed"], "flips": result.stats["flips"], "roles_final": result.stats["roles_final"],
           "role_decisions": result.stats["role_decisions"], "goodput": {}, "attainment": {}}
    span_s = max(r.arrival_s for r in result.requests) - min(r.arrival_s for r in result.requests)
    for label, slo in SLOS:
        met = sum(1 for rec in result.records if slo.met_by(rec))
        row["attainment"][label] = met / len(result.records)
        row["goodput"][label] = met / span_s if span_s > 0 else 0.0
    return row


def placement(wl: Workload, mode: str, row: dict) -> str:
    if mode in ("colocated", "colocated-chunked"):
        return "8 mixed"
    if mode.startswith("auto"):
        end = " ".join(f"{row['roles_final'][role]}{role[0].upper()}" for role in ("prefill", "mixed", "decode")
                       if row["roles_final"].get(role))
        start = row.get("start")
        begin = "all mixed" if start is None else f"{start[0]}:{start[1]}"
        return f"{begin} -> {end} ({row['flips']} flips)"
    return f"{wl.split[0]}:{wl.split[1]}"


def versus_best(rows: dict[str, dict], mode: str, label: str) -> str:
    """Goodput at one SLO over the better of the baselines that ran ('' for a baseline, and
    for an auto run declaring the other SLO)."""
    base = [rows[m]["goodput"][label] for m in BASELINES if m in rows]
    if mode in BASELINES or not base or max(base) <= 0 or (mode.startswith("auto@") and mode != f"auto@{label}"):
        return ""
    return f"{rows[mode]['goodput'][label] / max(base):.2f}x"


def render(results: dict[str, dict[str, dict[str, dict]]], num_requests: int, elapsed_s: float,
           workloads: tuple[Workload, ...] = WORKLOADS) -> list[str]:
    g1, g2 = (label for label, _ in SLOS)
    out = ["## Issue 19: every mode at TPOT SLOs of 50 ms and 25 ms (items 3 and 4)", "",
           f"Generated by `tools/sim_results.py` (simulated; nothing here ran on a GPU) in {elapsed_s / 60:.1f} "
           f"minutes on the shared 2-core host. {num_requests} requests per run (LPLD 1.5x).", "",
           f"Goodput: requests meeting TTFT <= 1 s and TPOT <= {g1} (or {g2}) per second of arrivals (the "
           "offered rate x SLO attainment; the run's drain tail is left out, so equal attainment is equal "
           "goodput). `vs best`: the mode's goodput over the better of colocated-chunked and disagg at the "
           "same SLO. `auto@X` declares the SLO X to the role policy (it paces decode steps against that TPOT); "
           "its P:D column is the start (tetri-plan's pick for X; all mixed: plan picked colocated-chunked) -> "
           "the roles at the end (P prefill, M mixed, D decode).", "",
           f"| workload | load | mode | P:D | mean TTFT (s) | p99 TTFT (s) | p99 TPOT (ms) | mean JCT (s) | "
           f"goodput @{g1} | goodput @{g2} | vs best @{g1} | vs best @{g2} |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for wl in workloads:
        for load, rows in results.get(wl.name, {}).items():
            for mode, r in rows.items():
                failed = f" ({r['failed']} failed)" if r["failed"] else ""
                out.append(f"| {wl.name} | {load} | {mode} | {placement(wl, mode, r)} | {r['ttft_mean_s']:.3f} | "
                           f"{r['ttft_p99_s']:.3f} | {r['tpot_p99_s'] * 1e3:.1f} | {r['jct_mean_s']:.2f}{failed} | "
                           f"{r['goodput'][g1]:.1f} | {r['goodput'][g2]:.1f} | {versus_best(rows, mode, g1)} | "
                           f"{versus_best(rows, mode, g2)} |")
    out += ["", "Each row is one run of:", "", "```",
            "tetri-sim " + " ".join(run_flags(workloads[0], "LOAD", "MODE", num_requests)).replace(
                workloads[0].flags, "WORKLOAD").replace("--rate LOAD", "LOAD"),
            "# WORKLOAD: --workload lpld|lphd|hpld|hphd|mixed or --trace " + AZURE + "; LOAD: --rate R or "
            "--time-scale T; MODE auto@X: --mode auto --slo ttft=1,tpot=X; --prefill/--decode only for "
            "disagg, tetri (the split) and auto (plan's split; none when it starts all mixed); "
            "--predictor-accuracy 0.75 for tetri and auto", "```", ""]
    return out


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text from `begin` to `end` in `path` with `section` (appended when absent)."""
    text = path.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def run_all(workloads: tuple[Workload, ...], modes: list[str], num_requests: int, common: str = COMMON,
            log=None) -> dict:
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for wl in workloads:
        for load, load_flag in wl.loads:
            for mode in row_modes(modes):
                start = time.monotonic()
                row = simulate_row(run_flags(wl, load_flag, mode, num_requests, common))
                if mode.startswith("auto@"):
                    row["start"] = plan_start(wl, dict(SLOS)[mode.partition("@")[2]], common)
                results.setdefault(wl.name, {}).setdefault(load, {})[mode] = row
                if log is not None:
                    print(f"{wl.name} {load} {mode}: goodput {row['goodput']} ({time.monotonic() - start:.1f} s)",
                          file=log, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sim_results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=4000)
    p.add_argument("--workloads", nargs="+", choices=[w.name for w in WORKLOADS])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--write", help="replace the section in this file")
    p.add_argument("--json", dest="json_path", help="write every row's figures here")
    args = p.parse_args(argv)
    chosen = tuple(w for w in WORKLOADS if not args.workloads or w.name in args.workloads)
    start = time.monotonic()
    results = run_all(chosen, args.modes, args.num_requests, log=sys.stderr)
    section = "\n".join([BEGIN, *render(results, args.num_requests, time.monotonic() - start, chosen), END]) + "\n"
    print(section)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1) + "\n")
    if args.write:
        write_section(Path(args.write), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
