"""Decode-side prefix caching on a multi-turn chat: the KV a handoff copies, caching on vs off.

Conversations are built from the AlpacaEval records in ../shared/datasets/alpaca_eval (read in
place): after a seeded shuffle, conversation c takes `--turns` consecutive records; its turn t
sends the whole history: every earlier instruction with the answer the server returned for it
(`--answers served`, what a chat client sends back) or the dataset's answer (`--answers
dataset`), then instruction t. Two `tetri-serve` servers, each 1 prefill + 1 decode worker,
run the same model, one as started by default (prefix caching on, on both workers) and one
with `--no-enable-prefix-caching`; they serve the same conversations one after the other
(`--concurrency` conversations at a time, each conversation's turns in order), through the
official openai SDK, greedy. Reported per server, from its own counters: the prompt KV blocks
the decode worker copied from the prefill worker and those it attached from its own cache
(`/workers`: handoff_blocks_copied / handoff_blocks_cached), the bytes copied and the copy time
(`/metrics`: tetri:kv_transfer_bytes_total, tetri:kv_transfer_seconds), the outputs compared
token for token, and both servers idle with every KV block free at the end.

    python tools/bench_decode_prefix_cache.py --conversations 4 --turns 4 --concurrency 2 [--model DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.runtime.server_proc import ServerProc  # noqa: E402

DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "alpaca_eval" / "model_outputs"


def load_conversations(path: Path, num: int, turns: int, seed: int) -> list[list[dict]]:
    records = json.loads(path.read_text())
    random.Random(seed).shuffle(records)
    if num * turns > len(records):
        raise ValueError(f"{path.name} has {len(records)} records, fewer than {num} x {turns}")
    return [records[c * turns:(c + 1) * turns] for c in range(num)]


def run_conversation(server: ServerProc, model: str, conv: list[dict], answers: str, max_tokens: int) -> list[list[int]]:
    client, msgs, outs = server.openai(timeout=600), [], []
    for rec in conv:
        msgs.append({"role": "user", "content": rec["instruction"]})
        out = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0.0,
                                             extra_body={"return_token_ids": True})
        choice = out.choices[0]
        outs.append(choice.model_extra["token_ids"])
        msgs.append({"role": "assistant", "content": choice.message.content if answers == "served" else rec["output"]})
    return outs


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def serve(args, caching: bool, convs: list[list[dict]]) -> dict:
    extra = [] if caching else ["--no-enable-prefix-caching"]
    model = ["--model", args.model] if args.model else []
    server = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "1", *model, *extra, ready_timeout_s=600)
    server.start()
    try:
        name = server.openai().models.list().data[0].id
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            outs = list(pool.map(lambda c: run_conversation(server, name, c, args.answers, args.max_tokens), convs))
        idle = server.wait_idle(timeout_s=30)
        row = next(w for w in server.workers() if w["role"] == "decode")
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.stop()
    return dict(outs=outs, idle=idle, copied=row["handoff_blocks_copied"], cached=row["handoff_blocks_cached"],
                bytes=metric(text, "tetri:kv_transfer_bytes_total"),
                copy_s=metric(text, "tetri:kv_transfer_seconds_sum"),
                handoffs=metric(text, "tetri:kv_handoffs_total"),
                paths=",".join(sorted(set(re.findall(r'^tetri:kv_transfer_path_bytes_total\{path="(\w+)"\}', text, re.M)))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--answers", choices=("served", "dataset"), default="served")
    ap.add_argument("--dataset", default=str(DATASET / "gpt4_0314.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    convs = load_conversations(Path(args.dataset), args.conversations, args.turns, args.seed)
    on, off = serve(args, True, convs), serve(args, False, convs)
    equal = sum(a == b for ca, cb in zip(on["outs"], off["outs"]) for a, b in zip(ca, cb))
    total = args.conversations * args.turns
    print(f"{args.conversations} conversations x {args.turns} turns, answers {args.answers}, "
          f"{args.max_tokens} new tokens, concurrency {args.concurrency}")
    print("| decode-side caching | path | handoffs | blocks copied | blocks from cache | bytes copied | copy time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, r in (("on", on), ("off", off)):
        print(f"| {label} | {r['paths']} | {r['handoffs']:.0f} | {r['copied']} | {r['cached']} | "
              f"{r['bytes'] / 2**20:.2f} MiB | {r['copy_s'] * 1e3:.1f} ms |")
    ratio = on["bytes"] / off["bytes"] if off["bytes"] else float("nan")
    print(f"bytes copied on/off = {ratio:.2f}x; outputs equal {equal}/{total}; idle with every block free: "
          f"on {on['idle']}, off {off['idle']}")
    return 0 if equal == total and on["idle"] and off["idle"] else 1


if __name__ == "__main__":
    sys.exit(main())
