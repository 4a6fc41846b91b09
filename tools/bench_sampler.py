"""The batched sampler against the per-row one it replaced, side by side on the same logits.

"per-row" is tests/engine/reference_sampler.py: the sampler of e73b007 with its draw changed
to the batched sampler's (inverse CDF at one uniform per row; the old one called
torch.multinomial per row, of about the same cost). Each configuration runs both samplers in
alternation and keeps the best of `--repeats` rounds of `--steps` calls; the ratio printed is
per-row time / batched time (> 1: the batched sampler is faster). Rows sit at different
output positions with a few output tokens each, as in decode.

    python tools/bench_sampler.py --batch 16 64 --vocab 32000
    python tools/bench_sampler.py --engine --batch 16   # decode tok/s, same LLM, samplers swapped

`--engine` runs tools/bench_engine.py's ~100M random Llama (vocab 32000) through `tetri.LLM`:
16-token prompts, 64 new tokens at temperature 0.8, top_p 0.9 (so decode dominates), the
per-row and the batched sampler in alternation on the same engine, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.engine.reference_sampler import ReferenceSampler  # noqa: E402
from tetri.types import SamplingParams  # noqa: E402
from tetri.workers.sampler import Sampler, SampleRow  # noqa: E402

CONFIGS = {
    "greedy": dict(temperature=0.0),
    "t0.8 top_p0.9": dict(temperature=0.8, top_p=0.9),
    "t0.8 top_p0.9 seeded": dict(temperature=0.8, top_p=0.9, seed=1),
    "t0.7 top_k50": dict(temperature=0.7, top_k=50, seed=1),
    "+penalties+logprobs5": dict(temperature=0.8, top_p=0.9, presence_penalty=0.5, repetition_penalty=1.1,
                                 logprobs=5, seed=1),
}


def best_time(sampler, logits, rows, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        sampler.sample(logits, rows)
    return (time.perf_counter() - start) / steps


def bench_engine_decode(batches: list[int], repeats: int) -> None:
    import tempfile

    from tools.bench_engine import build_model
    from tetri import LLM

    params = SamplingParams(max_tokens=64, temperature=0.8, top_p=0.9, ignore_eos=True)
    with tempfile.TemporaryDirectory() as d:
        build_model(d)
        llm = LLM(d, dtype="float32", kv_cache_gb=1.0)
        samplers = {"per-row": ReferenceSampler(llm.executor.eos_token_ids), "batched": llm.executor.sampler}
        print(f"{'batch':>5} {'per-row tok/s':>14} {'batched tok/s':>14} {'batched/per-row':>16}")
        for b in batches:
            prompts = torch.randint(3, 32000, (b, 16), generator=torch.Generator().manual_seed(b)).tolist()
            best = {name: 0.0 for name in samplers}
            for _ in range(repeats):
                for name, sampler in samplers.items():
                    llm.executor.sampler = sampler
                    start = time.perf_counter()
                    llm.generate(prompts, params)
                    best[name] = max(best[name], b * 64 / (time.perf_counter() - start))
            print(f"{b:>5} {best['per-row']:>14.1f} {best['batched']:>14.1f} {best['batched'] / best['per-row']:>15.2f}x")
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", action="store_true", help="decode tok/s through tetri.LLM instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine:
        bench_engine_decode(args.batch, args.repeats)
        return
    print(f"{'batch':>5} {'config':<22} {'per-row ms':>10} {'batched ms':>10} {'per-row/batched':>16}")
    for b in args.batch:
        with torch.inference_mode():
            logits = torch.randn(b, args.vocab, generator=torch.Generator().manual_seed(b)) * 3
        for name, opts in CONFIGS.items():
            rows = [SampleRow(SamplingParams(**opts), list(range(100 + i, 120 + i)), list(range(1, 129)), 0)
                    for i in range(b)]
            old, new = ReferenceSampler((2,)), Sampler((2,))
            times = {"old": [], "new": []}
            for _ in range(args.repeats):
                times["old"].append(best_time(old, logits, rows, args.steps))
                times["new"].append(best_time(new, logits, rows, args.steps))
            t_old, t_new = min(times["old"]), min(times["new"])
            print(f"{b:>5} {name:<22} {t_old * 1e3:>10.2f} {t_new * 1e3:>10.2f} {t_old / t_new:>15.2f}x")


if __name__ == "__main__":
    main()
