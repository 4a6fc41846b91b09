"""`tetri-bench`: load generator for OpenAI-compatible LLM servers.

Examples:
  tetri-bench --base-url http://127.0.0.1:8000 --workload mixed --rate 4 --slo ttft=1,tpot=0.1
  tetri-bench --base-url http://127.0.0.1:8000 --trace azure_llm_2023/AzureLLMInferenceTrace_conv.csv
      --time-scale 2 --length-scale 0.1 --json out.json --plot-dir plots   (one line; trace paths may be
      relative to cwd, the repo root or ../shared/traces)
  tetri-bench --base-url http://127.0.0.1:8000 --workload lphd --sweep-rates 1,2,4,8 --slo ttft=1,tpot=0.1
  tetri-bench --base-url http://127.0.0.1:8000 --chat-conversations 8 --chat-turns 4 --concurrency 4
      (multi-turn chat from ../shared/datasets/alpaca_eval: each turn resends the whole history, with
      the answers this server gave; --chat-history dataset resends the dataset's answers instead)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from tetri.bench import client, workload
from tetri.bench.records import RequestRecord
from tetri.bench.report import build_report, max_rate_at, plot_latency_cdfs, plot_sweep, print_report, sweep_entry
from tetri.bench.argtypes import positive_float as _positive_float, positive_int as _positive_int
from tetri.bench.argtypes import positive_floats as _rates, slo as _slo

ATTAINMENT_TARGET = 0.9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetri-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model name (default: first id from GET /v1/models, else 'default')")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="Azure CSV, Mooncake JSONL or length-stats CSV (path, or relative "
                                     "to the repo root or the shared traces folder)")
    src.add_argument("--workload", choices=workload.WORKLOAD_NAMES,
                     help="TetriInfer class (prompt cut-off 512, output cut-off 128 tokens) drawn from "
                          "Azure 2023 conv + ShareGPT-8K lengths, 'mixed' (equal shares), or 'random'")
    src.add_argument("--chat-conversations", type=_positive_int,
                     help="multi-turn chat: this many conversations of --chat-turns turns from the AlpacaEval "
                          "records in ../shared/datasets, each turn sent with the whole history")
    p.add_argument("--chat-turns", type=_positive_int, default=4)
    p.add_argument("--chat-history", choices=workload.CHAT_HISTORY_MODES, default="served",
                   help="answers the history carries: the ones this server gave (default) or the dataset's")
    p.add_argument("--chat-dataset", help=f"AlpacaEval model-outputs JSON (default: "
                                          f"../shared/datasets/{workload.CHAT_DATASET_RELPATH})")
    p.add_argument("--num-requests", type=_positive_int, default=100)
    arrival = p.add_mutually_exclusive_group()
    arrival.add_argument("--rate", type=_positive_float,
                         help="Poisson arrivals at this many req/s ('inf': all at once)")
    arrival.add_argument("--time-scale", type=_positive_float,
                         help="replay trace timestamps divided by this (2 = twice as fast)")
    arrival.add_argument("--concurrency", type=_positive_int, help="closed loop with this many in flight")
    p.add_argument("--length-scale", type=_positive_float, default=1.0,
                   help="multiply prompt and output lengths (min 1 token)")
    p.add_argument("--max-prompt-tokens", type=_positive_int)
    p.add_argument("--max-output-tokens", type=_positive_int)
    p.add_argument("--slo", type=_slo, help="ttft=SECONDS,tpot=SECONDS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="write the JSON report here")
    p.add_argument("--plot-dir", help="write PNG plots here")
    p.add_argument("--sweep-rates", type=_rates, help="R1,R2,...: one Poisson run per rate (needs --slo)")
    p.add_argument("--duration-s", type=_positive_float, help="stop sending new requests after this")
    p.add_argument("--api-key")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--vocab-size", type=int, default=client.DEFAULT_VOCAB_SIZE,
                   help="prompt token ids are drawn from [10, vocab-size)")
    p.add_argument("--request-timeout-s", type=_positive_float, default=client.DEFAULT_REQUEST_TIMEOUT_S)
    p.add_argument("--trace-dir", help="shared traces folder (default: ../shared/traces)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace, model: str, rate: float | None, num_sent: int) -> dict[str, Any]:
    return {
        "base_url": args.base_url, "model": model, "endpoint": args.endpoint,
        "trace": args.trace, "workload": args.workload, "num_requests": args.num_requests,
        "num_sent": num_sent, "rate": None if rate is None or math.isinf(rate) else rate,
        "time_scale": args.time_scale, "concurrency": args.concurrency,
        "length_scale": args.length_scale, "max_prompt_tokens": args.max_prompt_tokens,
        "max_output_tokens": args.max_output_tokens, "slo": args.slo.to_dict() if args.slo else None,
        "seed": args.seed, "duration_s": args.duration_s, "vocab_size": args.vocab_size,
        "request_timeout_s": args.request_timeout_s,
    }


def _workload(args: argparse.Namespace, rate: float | None) -> list[workload.Request]:
    return workload.build_workload(
        trace=args.trace, workload=args.workload, num_requests=args.num_requests, rate=rate,
        time_scale=args.time_scale, concurrency=args.concurrency, length_scale=args.length_scale,
        max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
        duration_s=args.duration_s, seed=args.seed,
        traces_dir=Path(args.trace_dir) if args.trace_dir else None)


async def _run_once(args: argparse.Namespace, model: str, reqs: list[workload.Request], label: str
                    ) -> tuple[list[RequestRecord], float]:
    from tqdm import tqdm

    with tqdm(total=len(reqs), desc=label, unit="req", disable=True if args.no_progress else None,
              file=sys.stderr) as bar:
        return await client.run_requests(
            args.base_url, reqs, model=model, endpoint=args.endpoint, concurrency=args.concurrency,
            duration_s=args.duration_s, api_key=args.api_key, vocab_size=args.vocab_size,
            seed=args.seed, request_timeout_s=args.request_timeout_s, on_done=lambda _rec: bar.update(1))


CHAT_DEFAULT_MAX_TOKENS = 128


async def _run_chat(args: argparse.Namespace, model: str) -> tuple[dict[str, Any], dict[str, list[RequestRecord]]]:
    convs = workload.load_chat_conversations(args.chat_dataset, args.chat_conversations, args.chat_turns, args.seed)
    max_tokens = args.max_output_tokens or CHAT_DEFAULT_MAX_TOKENS
    records, duration_s = await client.run_conversations(
        args.base_url, convs, model=model, max_tokens=max_tokens, history=args.chat_history,
        concurrency=args.concurrency, api_key=args.api_key, request_timeout_s=args.request_timeout_s)
    config = {**_config(args, model, None, len(records)), "endpoint": "chat", "max_output_tokens": max_tokens,
              "chat_conversations": args.chat_conversations, "chat_turns": args.chat_turns,
              "chat_history": args.chat_history, "chat_dataset": args.chat_dataset}
    return build_report(records, duration_s, args.slo, config), {"run": records}


async def _amain(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[RequestRecord]]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    model = args.model or await client.fetch_model_name(args.base_url, headers) or "default"
    if args.chat_conversations:
        return await _run_chat(args, model)
    runs: dict[str, list[RequestRecord]] = {}
    if not args.sweep_rates:
        rate = args.rate
        reqs = _workload(args, rate)
        records, duration_s = await _run_once(args, model, reqs, "tetri-bench")
        runs["run"] = records
        return build_report(records, duration_s, args.slo, _config(args, model, rate, len(reqs))), runs
    sweep, reports = [], {}
    for rate in args.sweep_rates:
        reqs = _workload(args, rate)
        records, duration_s = await _run_once(args, model, reqs, f"rate {rate:g}")
        runs[f"{rate:g} req/s"] = records
        reports[rate] = build_report(records, duration_s, args.slo, _config(args, model, rate, len(reqs)))
        sweep.append(sweep_entry(rate, reports[rate]))
    best = max_rate_at(sweep, ATTAINMENT_TARGET)
    # Top-level numbers: the run at the best rate meeting 90%, else the lowest swept rate.
    report = dict(reports[best if best is not None else min(args.sweep_rates)])
    report["sweep"] = sweep
    report["max_rate_at_90"] = best
    report["config"] = {**report["config"], "sweep_rates": args.sweep_rates}
    return report, runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep_rates and not args.slo:
        parser.error("--sweep-rates needs --slo")
    if args.sweep_rates and (args.rate or args.time_scale or args.concurrency):
        parser.error("--sweep-rates sets the rate itself; drop --rate/--time-scale/--concurrency")
    if args.chat_conversations and (args.rate or args.time_scale or args.sweep_rates or args.duration_s):
        parser.error("--chat-conversations sends each turn after the last one's answer: use --concurrency, "
                     "not --rate/--time-scale/--sweep-rates/--duration-s")
    if args.vocab_size <= client.PROMPT_ID_LOW:
        parser.error(f"--vocab-size must be > {client.PROMPT_ID_LOW}")
    try:
        report, runs = asyncio.run(_amain(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"tetri-bench: error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    failed = [r for recs in runs.values() for r in recs if not r.ok]
    if failed:
        print(f"{len(failed)} request(s) failed; first error: {failed[0].error}", file=sys.stderr)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot_dir:
        plot_latency_cdfs(runs, Path(args.plot_dir) / "latency_cdf.png", args.slo)
        if report.get("sweep"):
            plot_sweep(report["sweep"], Path(args.plot_dir) / "slo_attainment_vs_rate.png", ATTAINMENT_TARGET)
    return 0 if report["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
