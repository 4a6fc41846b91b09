"""Prefix caching on a multi-turn chat workload: caching on vs off, side by side in one run.

Conversations are built from the AlpacaEval records in ../shared/datasets/alpaca_eval (read in
place): after a seeded shuffle, conversation c takes `--turns` consecutive records; its turn t
sends the whole history (every earlier instruction with that record's answer from the dataset
file, then instruction t), as a chat client does. Two `tetri-serve` servers run the same model,
one as started by default (prefix caching on) and one with `--no-enable-prefix-caching`. Each
wave sends turn t of `--concurrency` conversations to one server, waits for every answer, then
sends the same wave to the other (which goes first alternates), so each request is measured
at the same concurrency, with no load from the other server, and slow drifts of the shared
machine hit both alike. Requests go through the official openai SDK, streamed (TTFT = the first
chunk carrying tokens), greedy, with token ids returned; the outputs of the two servers are
compared token for token. At the end both servers must be idle with every KV block free.

    python tools/bench_prefix_cache.py --conversations 8 --turns 4 --concurrency 4 [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.runtime.server_proc import ServerProc  # noqa: E402

DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "alpaca_eval" / "model_outputs"


def conversations(path: Path, num: int, turns: int, seed: int, answer_chars: int | None) -> list[list[dict]]:
    """`num` conversations of `turns` (instruction, answer) records, in order."""
    records = json.loads(path.read_text())
    random.Random(seed).shuffle(records)
    if num * turns > len(records):
        raise ValueError(f"{path.name} has {len(records)} records, fewer than {num} x {turns}")
    out = []
    for c in range(num):
        recs = records[c * turns:(c + 1) * turns]
        out.append([{"instruction": r["instruction"], "answer": r["output"][:answer_chars]} for r in recs])
    return out


def messages_for(conv: list[dict], turn: int) -> list[dict]:
    msgs = []
    for rec in conv[:turn]:
        msgs += [{"role": "user", "content": rec["instruction"]}, {"role": "assistant", "content": rec["answer"]}]
    return msgs + [{"role": "user", "content": conv[turn]["instruction"]}]


async def one_request(client, model: str, msgs: list[dict], max_tokens: int) -> dict:
    try:
        return await _stream(client, model, msgs, max_tokens)
    except Exception as e:  # reported, never hidden: the run then exits non-zero
        return dict(ttft_s=None, e2e_s=None, token_ids=None, prompt_tokens=0, error=f"{type(e).__name__}: {e}")


async def _stream(client, model: str, msgs: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, tokens, prompt_ids = None, [], None
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
    return dict(ttft_s=ttft, e2e_s=time.perf_counter() - start, token_ids=tokens,
                prompt_tokens=len(prompt_ids or ()))


async def run(servers: dict[str, ServerProc], convs: list[list[dict]], turns: int, concurrency: int,
              max_tokens: int) -> dict[str, list[dict]]:
    import openai

    clients = {k: openai.AsyncOpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
               for k, s in servers.items()}
    models = {k: (await c.models.list()).data[0].id for k, c in clients.items()}
    results: dict[str, list[dict]] = {k: [] for k in servers}
    order = list(servers)
    wave = 0
    for first in range(0, len(convs), concurrency):
        group = convs[first:first + concurrency]
        for turn in range(turns):
            for name in (order if wave % 2 == 0 else order[::-1]):
                outs = await asyncio.gather(*(one_request(clients[name], models[name], messages_for(conv, turn),
                                                          max_tokens) for conv in group))
                for i, out in enumerate(outs):
                    results[name].append(dict(out, conversation=first + i, turn=turn))
            wave += 1
            print(f"  wave {wave}: conversations {first}..{first + len(group) - 1}, turn {turn + 1}/{turns}",
                  file=sys.stderr)
    for c in clients.values():
        await c.close()
    return results


def summarize(results: dict[str, list[dict]], servers: dict[str, ServerProc]) -> dict:
    report = {}
    for name, recs in results.items():
        errors = [r["error"] for r in recs if r.get("error")]
        if errors:
            print(f"{name}: {len(errors)} request(s) failed, first: {errors[0]}\n{servers[name].log_tail()}",
                  file=sys.stderr)
        recs = [r for r in recs if not r.get("error")]
        ttfts = [r["ttft_s"] for r in recs]
        rows = servers[name].workers()
        queries = sum(w["prefix_cache_queries"] for w in rows)
        hits = sum(w["prefix_cache_hits"] for w in rows)
        report[name] = dict(requests=len(recs), failed=len(errors), mean_ttft_s=statistics.fmean(ttfts),
                            median_ttft_s=statistics.median(ttfts),
                            mean_ttft_later_turns_s=statistics.fmean(r["ttft_s"] for r in recs if r["turn"] > 0),
                            mean_prompt_tokens=statistics.fmean(r["prompt_tokens"] for r in recs),
                            prefix_cache_queries=queries, prefix_cache_hits=hits,
                            hit_rate=hits / queries if queries else 0.0,
                            idle_all_blocks_free=servers[name].wait_idle(30.0))
    on, off = results["caching on"], results["caching off"]
    same = sum(a["token_ids"] == b["token_ids"] and a["token_ids"] is not None for a, b in zip(on, off))
    report["outputs_identical"] = f"{same}/{len(on)}"
    report["mean_ttft_ratio_on_over_off"] = report["caching on"]["mean_ttft_s"] / report["caching off"]["mean_ttft_s"]
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: tetri-serve's default model")
    ap.add_argument("--dataset-file", default="gpt4_0314.json", help="file under ../shared/datasets/alpaca_eval/model_outputs")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4, help="conversations in flight per wave")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--answer-chars", type=int, default=None, help="cut each dataset answer to this many characters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    convs = conversations(DATASET / args.dataset_file, args.conversations, args.turns, args.seed, args.answer_chars)
    common = ["--device", "cpu"] + (["--model", args.model] if args.model else [])
    servers = {"caching on": ServerProc(*common, ready_timeout_s=600),
               "caching off": ServerProc(*common, "--no-enable-prefix-caching", ready_timeout_s=600)}
    try:
        for s in servers.values():
            s.start()
        results = asyncio.run(run(servers, convs, args.turns, args.concurrency, args.max_tokens))
        report = summarize(results, servers)
    finally:
        for s in servers.values():
            s.stop()
    report["config"] = vars(args)
    print(f"{'':28s}{'caching on':>14s}{'caching off':>14s}")
    for key in ("requests", "failed", "mean_prompt_tokens", "mean_ttft_s", "median_ttft_s", "mean_ttft_later_turns_s",
                "prefix_cache_hits", "prefix_cache_queries", "hit_rate", "idle_all_blocks_free"):
        a, b = report["caching on"][key], report["caching off"][key]
        fmt = (lambda v: f"{v:14.4f}") if isinstance(a, float) else (lambda v: f"{v!s:>14s}")
        print(f"{key:28s}{fmt(a)}{fmt(b)}")
    print(f"mean TTFT on/off: {report['mean_ttft_ratio_on_over_off']:.3f}x; outputs identical token for token: "
          f"{report['outputs_identical']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    ok = report["outputs_identical"].split("/")[0] == str(len(results["caching on"])) and all(
        report[k]["idle_all_blocks_free"] for k in servers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
