"""KV swap against recompute preemption on the real model code, CPU, side by side (issue 19 item 5).

The in-process real cluster of the runtime tests (`tests/runtime/inproc.py`: a prefill and a
decode `WorkerNode` with real pools and the real model, messages passed in process), the MLFQ
decode policy, and a decode pool too small for every request at once, so requests are
preempted. The same requests run with `preemption_mode` recompute, swap and auto, interleaved
`--repeats` times; the table gives each mode's wall time of the whole run, the decode worker's
swaps and recomputes, the costs it measured (seconds per copied block, per re-prefilled
token) and whether the greedy outputs equal recompute's token for token. CPU s is this process's
CPU time over the run (every thread; `time.process_time`): the work done, which the load other
processes put on the machine moves less than the wall time.

    python tools/bench_kv_swap.py [--model DIR] [--requests 6] [--prompt-tokens 400] [--max-tokens 40]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.runtime.inproc import Cluster  # noqa: E402
from tetri.workers.kv_pool import PoolLayout  # noqa: E402
from tetri.workers.models.loader import load_model  # noqa: E402
from tetri.workers.models.source import resolve_model_dir  # noqa: E402


def serve(model_dir, loaded, prompts, max_tokens, decode_blocks, mode, swap_gib):
    c = Cluster(model_dir, decode_policy="mlfq", decode_blocks=decode_blocks, num_blocks=decode_blocks * 4,
                loaded=loaded, prefix_caching=False, swap_space=swap_gib, preemption_mode=mode, chunk_size=512)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts):
        c.submit(f"r{i}", p, max_tokens=max_tokens)
    c.run(max_rounds=100000)
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    c.check()
    assert len(c.finished) == len(prompts) and c.blocks_used() == {0: 0, 1: 0}, (c.finished, c.failed)
    core = c.nodes[1].core
    return wall_s, cpu_s, dict(c.tokens), core


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the served default, SmolLM2-135M-Instruct)")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    loaded = load_model(model_dir)
    bs = 16
    rng = random.Random(0)
    vocab = loaded.spec.vocab_size
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    per_req = -(-(args.prompt_tokens + args.max_tokens) // bs)
    decode_blocks = 2 * -(-(args.prompt_tokens + 1) // bs) + 1  # two admitted; growing, one is preempted
    block_gib = PoolLayout.for_model(loaded.spec, 1, bs, loaded.dtype).block_bytes / 2**30
    swap_gib = per_req * args.requests * block_gib
    walls = {m: [] for m in ("recompute", "swap", "auto")}
    cpus = {m: [] for m in walls}
    seen = {}
    for _ in range(args.repeats):
        for mode in walls:
            wall_s, cpu_s, tokens, core = serve(model_dir, loaded, prompts, args.max_tokens, decode_blocks, mode,
                                                swap_gib)
            walls[mode].append(wall_s)
            cpus[mode].append(cpu_s)
            seen[mode] = (tokens, core.swaps, core.recomputes, core.costs.copy_s_per_block, core.costs.prefill_s_per_token)
    ref = seen["recompute"][0]
    print(f"model {model_dir}; {args.requests} requests x {args.prompt_tokens} prompt + {args.max_tokens} output "
          f"tokens; decode pool {decode_blocks} blocks of {bs}; {args.repeats} interleaved runs each")
    print("| preemption | wall s (median) | vs recompute | CPU s (median) | vs recompute | swaps | recomputes "
          "| copy ms/block | prefill ms/token | outputs = recompute |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base, cpu_base = statistics.median(walls["recompute"]), statistics.median(cpus["recompute"])
    for mode, (tokens, swaps, recs, copy_s, pre_s) in seen.items():
        med, cpu = statistics.median(walls[mode]), statistics.median(cpus[mode])
        fmt = lambda v: "-" if v is None else f"{1e3 * v:.3f}"  # noqa: E731
        print(f"| {mode} | {med:.2f} | {med / base:.2f}x | {cpu:.2f} | {cpu / cpu_base:.2f}x | {swaps} | {recs} "
              f"| {fmt(copy_s)} | {fmt(pre_s)} | {tokens == ref} |")


if __name__ == "__main__":
    main()
