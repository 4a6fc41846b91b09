"""Disaggregated vs colocated vs auto on the CPU, measured by tetri-bench on the same workload.

Starts `tetri-serve` once per mode on the same model (2 workers each: 1 prefill + 1 decode,
2 mixed, or `--mode auto`: tetri-plan's start for the SLO, then the role policy), replays one
scaled TetriInfer workload from the real traces against each with tetri-bench, and prints
TTFT, TPOT p99, JCT and goodput side by side with the ratios. With --repeats N the modes run
interleaved (d, c, a, d, c, a, ...) and each figure is the median over the N runs.

    python tools/compare_modes.py --workload mixed --rate 1.5 --num-requests 60 [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.runtime.server_proc import ServerProc  # noqa: E402
from tetri.bench.cli import main as bench_main  # noqa: E402


def build_model(out: str, hidden: int, layers: int) -> None:
    """A random Llama that uses the embedded default model's tokenizer (512 ids)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tetri.workers.models.default_model import ensure_default_model

    tok_dir = ensure_default_model()
    for name in os.listdir(tok_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(tok_dir, name), out)
    vocab = 512
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      max_position_embeddings=4096, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)


def run_mode(mode_args: list[str], bench_args: list[str], model: str | None) -> dict:
    flags = ["--device", "cpu", *mode_args] + (["--model", model] if model else [])
    srv = ServerProc(*flags).start()
    try:
        start = [w["role"] for w in srv.workers()]
        out = tempfile.mktemp(suffix=".json")
        bench_main(["--base-url", srv.base_url, *bench_args, "--json", out, "--no-progress"])
        with open(out) as f:
            report = json.load(f)
        body = srv.get("/workers")[1]
        roles = body.get("roles") or {}
        report |= dict(roles_start=start, roles_end=[w["role"] for w in body["workers"]],
                       role_decisions=roles.get("recent_decisions", []))
        return report
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir (default: build a ~11M random Llama, 6 layers x 384)")
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--rate", type=float, default=1.5)
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-output-tokens", type=int, default=128)
    ap.add_argument("--slo", default="ttft=2,tpot=0.1")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per mode (medians reported)")
    ap.add_argument("--auto-flags", default="", help="extra tetri-serve flags for --mode auto (e.g. role dwell)")
    ap.add_argument("--calibration", default=None,
                    help="auto plans on this calibration of the served model (tools/calibrate_served.py) and the "
                         "compared workload's shape, instead of the cpu preset")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure that calibration first (tools/calibrate_served.py, on the workload with seed + 1)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = tempfile.mkdtemp(prefix="tetri-cmp-model-")
        build_model(model, hidden=384, layers=6)
    plan = []
    if args.calibrate or args.calibration:
        calib = args.calibration or os.path.join(tempfile.mkdtemp(prefix="tetri-cmp-calib-"), "calib.json")
        if args.calibrate:
            from tools.calibrate_served import calibrate

            fit_load = ["--workload", args.workload, "--rate", str(args.rate), "--num-requests", "40",
                        "--length-scale", str(args.length_scale), "--max-prompt-tokens", str(args.max_prompt_tokens),
                        "--max-output-tokens", str(args.max_output_tokens), "--seed", str(args.seed + 1)]
            calibrate(model, calib, fit_load, args.chunk_size)
        plan = ["--plan-flags", f"--calibration {calib} --workload {args.workload} --length-scale {args.length_scale} "
                f"--max-prompt-tokens {args.max_prompt_tokens} --max-output-tokens {args.max_output_tokens} "
                f"--chunk-sizes {args.chunk_size}"]
    bench = ["--workload", args.workload, "--rate", str(args.rate), "--num-requests", str(args.num_requests),
             "--length-scale", str(args.length_scale), "--max-prompt-tokens", str(args.max_prompt_tokens),
             "--max-output-tokens", str(args.max_output_tokens), "--slo", args.slo, "--seed", str(args.seed),
             "--vocab-size", "500"]
    chunk = ["--chunk-size", str(args.chunk_size)]
    slo = dict(kv.split("=") for kv in args.slo.split(","))
    modes = {"disagg (1P+1D)": ["--mode", "disagg", "--prefill", "1", "--decode", "1", *chunk],
             "colocated (2 mixed)": ["--mode", "colocated", "--workers", "2", *chunk],
             "auto": ["--mode", "auto", "--workers", "2", "--slo-ttft", slo.get("ttft", "1"),
                      "--slo-tpot", slo.get("tpot", "0.05"), *chunk, *plan, *args.auto_flags.split()]}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    for _ in range(args.repeats):  # interleaved: one run of each mode per round
        for name, flags in modes.items():
            runs[name].append(run_mode(flags, bench, model))
    rows = [("mean TTFT s", lambda r: r["ttft_s"]["mean"]), ("p99 TTFT s", lambda r: r["ttft_s"]["p99"]),
            ("mean TPOT s", lambda r: r["tpot_s"]["mean"]), ("p99 TPOT s", lambda r: r["tpot_s"]["p99"]),
            ("mean JCT s", lambda r: r["e2e_s"]["mean"]), ("p99 JCT s", lambda r: r["e2e_s"]["p99"]),
            ("SLO attainment", lambda r: r["slo_attainment"]),
            ("goodput req/s", lambda r: r["goodput"]), ("completed", lambda r: r["completed"])]
    names = list(modes)
    print(f"workload={args.workload} rate={args.rate} n={args.num_requests} length_scale={args.length_scale} "
          f"slo={args.slo} repeats={args.repeats} (medians)")
    print(f"{'metric':<16}" + "".join(f"{n:>22}" for n in names) + f"{'auto/colocated':>16}{'auto/disagg':>13}")
    for label, get in rows:
        vals = [statistics.median(get(r) for r in runs[n]) for n in names]
        ratios = [f"{vals[2] / v:.2f}x" if v else "-" for v in (vals[1], vals[0])]
        print(f"{label:<16}" + "".join(f"{v:>22.4f}" for v in vals) + f"{ratios[0]:>16}{ratios[1]:>13}")
    for i, report in enumerate(runs["auto"]):
        print(f"auto run {i}: roles {report.get('roles_start')} -> {report.get('roles_end')}; "
              f"{len(report.get('role_decisions', []))} role changes: "
              + "; ".join(d["reason"] for d in report.get("role_decisions", [])))


if __name__ == "__main__":
    main()
