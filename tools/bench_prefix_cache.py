"""Prefix caching on a multi-turn chat workload: caching on vs off, side by side in one run.

Conversations are tetri-bench's multi-turn chat workload (`tetri.bench.workload.
load_chat_conversations`): AlpacaEval records from ../shared/datasets/alpaca_eval, read in
place; after a seeded shuffle, conversation c takes `--turns` consecutive records, and its turn
t sends the whole history (every earlier instruction with its answer, then instruction t), as a
chat client does. `--history` says which answers the history carries:

    served   (default) the answers the served model gave in the earlier turns, as a chat client
             resends them: the caching-off server's answers, sent to both servers, so their
             requests are identical (both servers' answers are compared token for token every
             wave; they must be equal, greedy, and the run fails when they are not)
    dataset  the dataset's answers (about 300 tokens each, text no server ever computed)

Two `tetri-serve` servers run the same model, one as started by default (prefix caching on) and
one with `--no-enable-prefix-caching`. Each wave sends turn t of `--concurrency` conversations
to one server, waits for every answer, then sends the same wave to the other (which goes first
alternates), so each request is measured at the same concurrency, with no load from the other
server, and slow drifts of the shared machine hit both alike. Requests go through the official
openai SDK, streamed (TTFT = the first chunk carrying tokens), greedy, with token ids returned;
the outputs of the two servers are compared token for token. At the end both servers must be
idle with every KV block free. Each server first answers one short warm-up request (its own
system prompt, so it shares no block with the conversations), not measured. Exit status 0 only
when every request succeeded, every output was identical and every block was free.

    python tools/bench_prefix_cache.py --conversations 4 --turns 4 --concurrency 2 [--history dataset] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.runtime.server_proc import ServerProc  # noqa: E402
from tetri.bench.workload import (CHAT_DATASET_RELPATH, CHAT_HISTORY_MODES, chat_messages,  # noqa: E402
                                  default_datasets_dir, load_chat_conversations)

ON, OFF = "caching on", "caching off"
WARM_UP = [{"role": "system", "content": "Warm-up."}, {"role": "user", "content": "Hello"}]


async def one_request(client, model: str, msgs: list[dict], max_tokens: int) -> dict:
    try:
        return await _stream(client, model, msgs, max_tokens)
    except Exception as e:  # reported, never hidden: the run then exits non-zero
        return dict(ttft_s=None, e2e_s=None, token_ids=None, text=None, prompt_tokens=0,
                    error=f"{type(e).__name__}: {e}")


async def _stream(client, model: str, msgs: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, tokens, prompt_ids, text, finish = None, [], None, [], None
    stream = await client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0.0,
                                                  stream=True, extra_body={"return_token_ids": True})
    async for chunk in stream:
        extra = chunk.model_extra or {}
        prompt_ids = extra.get("prompt_token_ids", prompt_ids)
        for choice in chunk.choices:
            ids = (choice.model_extra or {}).get("token_ids") or []
            if ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens += ids
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return dict(ttft_s=ttft, e2e_s=time.perf_counter() - start, token_ids=tokens, text="".join(text),
                finish_reason=finish, prompt_tokens=len(prompt_ids or ()), prompt_ids=prompt_ids or [])


async def run(servers: dict[str, ServerProc], convs, turns: int, concurrency: int, max_tokens: int,
              history: str) -> tuple[dict[str, list[dict]], list[str]]:
    """Every wave on both servers; returns (each server's records, the mismatches found)."""
    import openai

    clients = {k: openai.AsyncOpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
               for k, s in servers.items()}
    models = {k: (await c.models.list()).data[0].id for k, c in clients.items()}
    for k in servers:  # warm-up, not measured: its own system prompt shares no block with the conversations
        out = await one_request(clients[k], models[k], WARM_UP, 4)
        if out.get("error"):
            raise RuntimeError(f"{k}: warm-up request failed: {out['error']}")
    results: dict[str, list[dict]] = {k: [] for k in servers}
    mismatches: list[str] = []
    order = list(servers)
    wave = 0
    for first in range(0, len(convs), concurrency):
        group = convs[first:first + concurrency]
        answers: list[list[str]] = [[] for _ in group]  # the served answers so far (the caching-off server's)
        for turn in range(turns):
            msgs = [chat_messages(conv, turn, answers[i] if history == "served" else None)
                    for i, conv in enumerate(group)]
            outs = {}
            for name in (order if wave % 2 == 0 else order[::-1]):
                outs[name] = await asyncio.gather(*(one_request(clients[name], models[name], m, max_tokens)
                                                    for m in msgs))
                for i, out in enumerate(outs[name]):
                    results[name].append(dict(out, conversation=first + i, turn=turn, wave=wave))
            wave += 1
            for i, (a, b) in enumerate(zip(outs[ON], outs[OFF])):
                if a.get("error") or b.get("error") or a["token_ids"] != b["token_ids"]:
                    mismatches.append(f"conversation {first + i} turn {turn + 1}: caching on "
                                      f"{a.get('error') or a['token_ids']} vs off {b.get('error') or b['token_ids']}")
                    print(f"  MISMATCH {mismatches[-1]}", file=sys.stderr)
                if history == "served":
                    if b.get("error"):  # the next turn's history would have no answer: stop here
                        raise RuntimeError(f"caching-off server failed conversation {first + i} turn {turn + 1}: "
                                           f"{b['error']}")
                    answers[i].append(b["text"])
            print(f"  wave {wave}: conversations {first}..{first + len(group) - 1}, turn {turn + 1}/{turns}",
                  file=sys.stderr)
    for c in clients.values():
        await c.close()
    return results, mismatches


def summarize(results: dict[str, list[dict]], servers: dict[str, ServerProc]) -> dict:
    report = {}
    for name, recs in results.items():
        errors = [r["error"] for r in recs if r.get("error")]
        if errors:
            print(f"{name}: {len(errors)} request(s) failed, first: {errors[0]}\n{servers[name].log_tail()}",
                  file=sys.stderr)
        recs = [r for r in recs if not r.get("error")]
        rows = servers[name].workers()
        prefilling = [w for w in rows if w["role"] in ("prefill", "mixed")]  # decode workers' lookups: below
        queries = sum(w["prefix_cache_queries"] for w in prefilling)
        hits = sum(w["prefix_cache_hits"] for w in prefilling)
        handoff = {k: sum(w.get(k, 0) for w in rows) for k in ("handoff_blocks_copied", "handoff_blocks_cached")}
        turns = sorted({r["turn"] for r in recs})
        block_size = next((w["block_size"] for w in rows if w.get("block_size")), 16)
        report[name] = dict(requests=len(recs), failed=len(errors),
                            mean_ttft_s=_mean(r["ttft_s"] for r in recs),
                            median_ttft_s=statistics.median(r["ttft_s"] for r in recs) if recs else None,
                            mean_ttft_later_turns_s=_mean(r["ttft_s"] for r in recs if r["turn"] > 0),
                            mean_ttft_by_turn_s=[_mean(r["ttft_s"] for r in recs if r["turn"] == t) for t in turns],
                            mean_prompt_tokens=_mean(r["prompt_tokens"] for r in recs),
                            mean_output_tokens=_mean(len(r["token_ids"]) for r in recs),
                            prefix_cache_queries=queries, prefix_cache_hits=hits,
                            hits_from_earlier_waves=hits_from_earlier_waves(recs, block_size) if name == ON else 0,
                            hit_rate=hits / queries if queries else 0.0, **handoff,
                            idle_all_blocks_free=servers[name].wait_idle(30.0),
                            per_request=[{k: r[k] for k in ("conversation", "turn", "wave", "prompt_tokens", "ttft_s")}
                                         | {"output_tokens": len(r["token_ids"])} for r in recs])
    on, off = results[ON], results[OFF]
    same = sum(a["token_ids"] == b["token_ids"] and a["token_ids"] is not None for a, b in zip(on, off))
    report["outputs_identical"] = f"{same}/{len(on)}"
    report["all_outputs_identical"] = same == len(on) == len(off) > 0
    a, b = report[ON]["mean_ttft_s"], report[OFF]["mean_ttft_s"]
    report["mean_ttft_ratio_on_over_off"] = a / b if a is not None and b else None
    report["mean_ttft_ratio_by_turn"] = [x / y if x is not None and y else None for x, y in
                                         zip(report[ON]["mean_ttft_by_turn_s"], report[OFF]["mean_ttft_by_turn_s"])]
    return report


def hits_from_earlier_waves(recs: list[dict], block_size: int) -> int:
    """The prompt tokens a cache that lost nothing must serve: for each request, the full blocks
    of its longest common prefix with a prompt of an earlier wave (their KV was computed and
    committed before it arrived), leaving its last token to compute. A lower bound of what
    `prefix_cache_hits` should count: prompts of the same wave may share blocks too, by timing."""
    total = 0
    for r in recs:
        ids = r["prompt_ids"]
        common = max((_common_prefix(ids, e["prompt_ids"]) for e in recs if e["wave"] < r["wave"]), default=0)
        total += min(common, len(ids) - 1) // block_size * block_size
    return total


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def print_report(report: dict) -> None:
    print(f"history: {report['config']['history']}")
    print(f"{'':28s}{ON:>14s}{OFF:>14s}")
    for key in ("requests", "failed", "mean_prompt_tokens", "mean_output_tokens", "mean_ttft_s", "median_ttft_s",
                "mean_ttft_later_turns_s", "prefix_cache_hits", "hits_from_earlier_waves", "prefix_cache_queries",
                "handoff_blocks_copied", "handoff_blocks_cached",
                "hit_rate", "idle_all_blocks_free"):
        a, b = report[ON][key], report[OFF][key]
        fmt = (lambda v: f"{v:14.4f}") if isinstance(a, float) else (lambda v: f"{v!s:>14s}")
        print(f"{key:28s}{fmt(a)}{fmt(b)}")
    by_turn = " ".join(f"{r:.2f}" if r is not None else "-" for r in report["mean_ttft_ratio_by_turn"])
    ratio = report["mean_ttft_ratio_on_over_off"]
    print(f"mean TTFT on/off by turn: {by_turn}")
    print(f"mean TTFT on/off: {ratio:.3f}x; " if ratio is not None else "mean TTFT on/off: -; ", end="")
    print(f"outputs identical token for token: {report['outputs_identical']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: tetri-serve's default model")
    ap.add_argument("--dataset-file", default=Path(CHAT_DATASET_RELPATH).name,
                    help="file under ../shared/datasets/alpaca_eval/model_outputs")
    ap.add_argument("--history", choices=CHAT_HISTORY_MODES, default="served",
                    help="answers in the history: the served model's own (default) or the dataset's")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4, help="conversations in flight per wave")
    ap.add_argument("--max-tokens", type=int, default=128,
                    help="answer length cap (with --history served, the answers the next turns resend)")
    ap.add_argument("--answer-chars", type=int, default=None, help="cut each dataset answer to this many characters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    datasets = default_datasets_dir()
    if datasets is None:
        ap.error("shared datasets folder not found (../shared/datasets, or set TETRI_DATASETS_DIR)")
    path = datasets / Path(CHAT_DATASET_RELPATH).parent / args.dataset_file
    convs = load_chat_conversations(path, args.conversations, args.turns, args.seed, args.answer_chars)
    common = ["--device", "cpu"] + (["--model", args.model] if args.model else [])
    servers = {ON: ServerProc(*common, ready_timeout_s=600),
               OFF: ServerProc(*common, "--no-enable-prefix-caching", ready_timeout_s=600)}
    try:
        for s in servers.values():
            s.start()
        results, mismatches = asyncio.run(run(servers, convs, args.turns, args.concurrency, args.max_tokens,
                                              args.history))
        report = summarize(results, servers)
    except RuntimeError as e:
        print(f"bench_prefix_cache: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for s in servers.values():
            s.stop()
    report["config"] = vars(args)
    report["mismatches"] = mismatches
    print_report(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    if report[ON]["prefix_cache_hits"] < report[ON]["hits_from_earlier_waves"]:
        print("bench_prefix_cache: WARNING: the cache served fewer tokens than earlier waves had computed "
              "(evictions, or a cached prefix recomputed)", file=sys.stderr)
    ok = report["all_outputs_identical"] and not mismatches and all(
        report[k]["idle_all_blocks_free"] and not report[k]["failed"] for k in servers)
    if not ok:
        print("bench_prefix_cache: FAILED: outputs differ, a request failed, or blocks were not free when idle",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
