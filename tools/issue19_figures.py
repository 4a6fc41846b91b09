"""Issue 19 items 2 and 6 in figures: the RESULTS.md section between the markers below.

    python tools/issue19_figures.py --study smollm2=STUDY.json [--study NAME=STUDY.json ...] \\
        --confusion smollm2=CONF.json [...] [--before-rev e73b007] [--write tetri/sim/RESULTS.md]

1. TetriDecode balance (`tools/sim_dispatch_balance.py`, RESULTS.md's mixed 100 req/s 5:3
   setup): `tetri` at `--before-rev` (its `tetri/` extracted with `git archive` and put first
   on PYTHONPATH), `tetri` now, `least-loaded` now.
2. The length predictor on held-back prompts: `tools/predictor_study.py` JSONs (each
   `--study NAME=PATH`), majority baseline against text / probe / joint, with the issue's
   targets (bucket accuracy >= 2x the majority's, within one bucket >= 70%) judged per row.
3. Simulator goodput with no predictor, the +-1 noise predictor at 0.75, each measured
   confusion (`--confusion NAME=PATH`, predictor_study's `--confusion-out`), and the oracle,
   on RESULTS.md's setup and on a memory-bound one (OPT-13B, V100, LPHD).

Prints the section; `--write FILE` replaces it in FILE between the markers (appended when absent).
`--commands NAME=TEXT` records the command that made a study (shown under its table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- issue19-figures:begin (tools/issue19_figures.py) -->"
END = "<!-- issue19-figures:end -->"
BALANCE_FLAGS = ("--mode tetri --workload mixed --num-requests 4000 --rate 100 --gpus 8 --prefill 5 --decode 3 "
                 "--model-preset llama3-8b --hardware h200 --slo ttft=1,tpot=0.05 --seed 0 --chunk-size 512 "
                 "--predictor-accuracy 0.75").split()
SIM_SETUPS = {
    "H200, Llama-3-8B, mixed 100 req/s, 5:3 (RESULTS.md)":
        "--mode tetri --workload mixed --num-requests 4000 --rate 100 --gpus 8 --prefill 5 --decode 3 "
        "--model-preset llama3-8b --hardware h200 --slo ttft=1,tpot=0.05 --seed 0 --chunk-size 512",
    "V100, OPT-13B, LPHD 3 req/s, 1:3 (memory-bound)":
        "--mode tetri --workload lphd --num-requests 300 --rate 3 --gpus 4 --prefill 1 --decode 3 "
        "--model-preset opt-13b --hardware v100 --slo ttft=2,tpot=0.2 --seed 0 --chunk-size 512",
}
TARGET_RATIO, TARGET_WITHIN_ONE = 2.0, 0.70


def _run_balance(flags: list[str], tetri_root: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tetri_root)}
    subprocess.run([sys.executable, str(ROOT / "tools" / "sim_dispatch_balance.py"), *flags, "--summary-json",
                    str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def balance_rows(before_rev: str, tmp: Path) -> list[tuple[str, dict]]:
    old = tmp / "old"
    old.mkdir()
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", before_rev, "tetri"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=tar.stdout, check=True)
    return [(f"`tetri` at {before_rev} (before)", _run_balance(BALANCE_FLAGS, old, tmp / "before.json")),
            ("`tetri` now", _run_balance(BALANCE_FLAGS, ROOT, tmp / "after.json")),
            ("`least-loaded` now", _run_balance(BALANCE_FLAGS + ["--decode-dispatch", "least-loaded"], ROOT,
                                               tmp / "ll.json"))]


def render_balance(rows: list[tuple[str, dict]], before_rev: str) -> list[str]:
    out = ["### TetriDecode balance (item 2)", "",
           "| decode dispatch | requests per decode worker | max / min | peak resident | heavy-share spread "
           "| p99 TPOT | mean JCT | goodput (req/s) |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for label, s in rows:
        reqs = [w["requests"] for w in s["workers"].values()]
        peaks = [w["peak_resident"] for w in s["workers"].values()]
        out.append(f"| {label} | {' / '.join(map(str, reqs))} | {max(reqs) / min(reqs):.2f} | "
                   f"{' / '.join(map(str, peaks))} | {s['heavy_share_spread']:.3f} | {s['tpot_p99_ms']:.1f} ms | "
                   f"{s['jct_mean_s']:.2f} s | {s['goodput']:.1f} |")
    out += ["", "Heavy-share spread: the mean over handoffs of max - min, across decode workers, of the "
            "predicted-heavy share of their resident requests. `max_num_seqs` is 256.", "", "```",
            "python tools/sim_dispatch_balance.py " + " ".join(BALANCE_FLAGS) + " [--decode-dispatch least-loaded]",
            f"# before: the same, with PYTHONPATH set to `git archive {before_rev} tetri` extracted", "```", ""]
    return out


def verdict(acc: float, within_one: float, majority: float) -> str:
    """The issue's two targets, met or missed and by how much."""
    need = TARGET_RATIO * majority
    if acc >= need:
        first = f"acc {acc / majority:.2f}x majority (met)"
    elif need > 1:
        first = f"acc {acc / majority:.2f}x majority (2x = {need:.3f} > 1: unreachable)"
    else:
        first = f"acc {acc / majority:.2f}x majority (2x = {need:.3f}; short by {need - acc:.3f})"
    second = ("within-1 met" if within_one >= TARGET_WITHIN_ONE else
              f"within-1 short by {TARGET_WITHIN_ONE - within_one:.3f}")
    return f"{first}; {second}"


def render_study(name: str, study: list[dict], command: str | None) -> list[str]:
    out = [f"#### `{name}`", ""]
    for res in study:
        t0, c0 = res["test"]["text"], res["cv_all"]["text"]
        out += [f"{res['bucket_tokens']}-token buckets, {res['n_train']} training / {res['n_test']} held-back "
                f"prompts (label counts {c0['label_counts']}):", "",
                f"| model | held-back acc | held-back within-1 | {res['folds']}-fold CV acc (all prompts) | "
                "CV within-1 | targets (held-back) |", "|---|---:|---:|---:|---:|---|",
                f"| majority bucket | {t0['majority_baseline']:.3f} | {t0['majority_within_one']:.3f} | "
                f"{c0['majority_baseline']:.3f} | {c0['majority_within_one']:.3f} | |"]
        for kind, label in (("text", "text model"), ("hidden", "probe on the last hidden state"),
                            ("joint", "text + probe")):
            t, c = res["test"][kind], res["cv_all"][kind]
            out.append(f"| {label} | {t['accuracy']:.3f} | {t['accuracy_within_one_bucket']:.3f} | "
                       f"{c['accuracy']:.3f} | {c['accuracy_within_one_bucket']:.3f} | "
                       f"{verdict(t['accuracy'], t['accuracy_within_one_bucket'], t0['majority_baseline'])} |")
        out.append("")
    if command:
        out += ["```", command, "```", ""]
    return out


def sim_rows(confusions: dict[str, str]) -> dict[str, list[tuple[str, dict]]]:
    from tetri.sim.cli import build_parser, build_requests, cost_model_from_args, sim_config
    from tetri.sim.simulator import sim_report, simulate

    predictors = [("none", ["--predictor", "none"]), ("+-1 noise at 0.75", ["--predictor-accuracy", "0.75"])]
    predictors += [(f"measured confusion `{n}` ({Path(p).name})", ["--predictor-confusion", p])
                   for n, p in confusions.items()]
    predictors.append(("oracle", ["--predictor", "oracle"]))
    table = {}
    for setup, flags in SIM_SETUPS.items():
        rows = []
        for label, extra in predictors:
            parser = build_parser()
            args = parser.parse_args(flags.split() + extra)
            result = simulate(build_requests(args, args.rate, args.time_scale), sim_config(args),
                              cost_model_from_args(args, parser))
            rows.append((label, {**sim_report(result, args.slo, {}), "extra": " ".join(extra),
                                 "predictions": result.stats["predictions"],
                                 "mispredictions": result.stats["mispredictions"]}))
        table[setup] = rows
    return table


def render_sim(table: dict[str, list[tuple[str, dict]]]) -> list[str]:
    out = ["### What the predictor changes in the simulator", ""]
    for setup, rows in table.items():
        out += [f"{setup}:", "", "| predictor | bucket accuracy in the run | goodput (req/s) | SLO attainment | "
                "mean TTFT | p99 TPOT | mean JCT |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in rows:
            acc = 1 - r["mispredictions"] / r["predictions"] if r["predictions"] else None
            out.append(f"| {label} | {'-' if acc is None else f'{acc:.3f}'} | {r['goodput']:.2f} | "
                       f"{r['slo_attainment']:.3f} | {r['ttft_s']['mean']:.3f} s | {r['tpot_s']['p99'] * 1e3:.1f} ms"
                       f" | {r['e2e_s']['mean']:.2f} s |")
        variants = " | ".join(" ".join(Path(a).name if a.endswith(".json") else a for a in r["extra"].split())
                              for _, r in rows)
        out += ["", "```", f"tetri-sim {SIM_SETUPS[setup]} {{{variants}}}",
                "```", ""]
    return out


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="issue19_figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--commands", action="append", default=[], metavar="NAME=TEXT")
    p.add_argument("--confusion", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--before-rev", default="e73b007")
    p.add_argument("--write", help="replace the section in this file")
    args = p.parse_args(argv)
    commands = _pairs(args.commands)
    with tempfile.TemporaryDirectory() as tmp:
        lines = [BEGIN, "## Issue 19: TetriDecode balance and the length predictor", "",
                 "Generated by `tools/issue19_figures.py` (simulated; nothing here ran on a GPU).", ""]
        lines += render_balance(balance_rows(args.before_rev, Path(tmp)), args.before_rev)
    lines += ["### The length predictor on held-back AlpacaEval prompts (item 6)", ""]
    for name, path in _pairs(args.study).items():
        lines += render_study(name, json.loads(Path(path).read_text()), commands.get(name))
    lines += render_sim(sim_rows(_pairs(args.confusion)))
    lines.append(END)
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        text = Path(args.write).read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + section.rstrip("\n") + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
