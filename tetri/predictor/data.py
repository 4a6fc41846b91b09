"""Training/eval examples: JSONL in, lengths counted, metrics out; AlpacaEval conversion.

JSONL: one object per line with `prompt` and either `output_tokens` (int) or `response`
(text; counted with the Hugging Face tokenizer when one is given, else whitespace words).
An optional `generator` names the model that wrote the response.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# The shared datasets folder sits beside the checkout (../shared relative to the repo root).
ALPACA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "alpaca_eval" / "model_outputs"
DEFAULT_ALPACA_MODELS = ("Meta-Llama-3-8B-Instruct",)


@dataclass
class Examples:
    prompts: list[str]
    lengths: list[int]
    generators: list[str | None]
    length_unit: str
    """"tokens" (given or counted by a tokenizer) or "words" (whitespace split)."""


class LengthCounter:
    """Counts response length: tokenizer tokens (no special tokens) or whitespace words."""

    def __init__(self, tokenizer_dir: str | None = None) -> None:
        self.tokenizer = None
        if tokenizer_dir:
            from transformers import AutoTokenizer  # lazy: heavy import

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    @property
    def unit(self) -> str:
        return "tokens" if self.tokenizer is not None else "words"

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_examples(path: str | Path, counter: LengthCounter | None = None) -> Examples:
    counter = counter or LengthCounter()
    prompts, lengths, gens, units = [], [], [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "prompt" not in rec:
                raise ValueError(f"{path}:{line_no}: no 'prompt'")
            if rec.get("output_tokens") is not None:
                lengths.append(int(rec["output_tokens"]))
                units.add("tokens")
            elif rec.get("response") is not None:
                lengths.append(counter(str(rec["response"])))
                units.add(counter.unit)
            else:
                raise ValueError(f"{path}:{line_no}: needs 'output_tokens' or 'response'")
            prompts.append(str(rec["prompt"]))
            gens.append(rec.get("generator"))
    if not prompts:
        raise ValueError(f"{path}: no examples")
    unit = units.pop() if len(units) == 1 else "mixed"
    return Examples(prompts, lengths, gens, unit)


def eval_metrics(pred_buckets: list[int], true_lengths: list[int], bucket_tokens: int,
                 num_buckets: int, majority_bucket: int) -> dict:
    """accuracy, accuracy_within_one_bucket, mae_tokens (|bucket midpoint - true length|),
    majority_baseline (accuracy of always answering the training majority bucket), n.
    True lengths beyond the top bucket count as the (open-ended) top bucket."""
    n = len(true_lengths)
    if n == 0 or len(pred_buckets) != n:
        raise ValueError("need one prediction per example and at least one example")
    true_b = [min(max(0, t) // bucket_tokens, num_buckets - 1) for t in true_lengths]
    hits = sum(p == t for p, t in zip(pred_buckets, true_b))
    near = sum(abs(p - t) <= 1 for p, t in zip(pred_buckets, true_b))
    mae = sum(abs((p + 0.5) * bucket_tokens - t) for p, t in zip(pred_buckets, true_lengths)) / n
    majority = sum(t == majority_bucket for t in true_b)
    return {"accuracy": hits / n, "accuracy_within_one_bucket": near / n, "mae_tokens": mae,
            "majority_baseline": majority / n, "n": n}


def split_prompts(instructions: list[str], train_fraction: float, seed: int) -> set[str]:
    """The training half of a deterministic split BY PROMPT: sorted unique prompts, shuffled
    with random.Random(seed), the first round(fraction * n) go to training."""
    unique = sorted(set(instructions))
    random.Random(seed).shuffle(unique)
    return set(unique[: round(train_fraction * len(unique))])


def prepare_alpaca(out_train: str | Path, out_test: str | Path, models=DEFAULT_ALPACA_MODELS,
                   train_fraction: float = 0.8, seed: int = 0, src_dir: str | Path = ALPACA_DIR) -> dict:
    """Convert AlpacaEval model outputs into JSONL (`prompt`, `response`, `generator`,
    `dataset`), split by prompt so no instruction is in both files. Returns counts."""
    records = []
    for model in models:
        with open(Path(src_dir) / f"{model}.json", encoding="utf-8") as f:
            records.extend(json.load(f))
    train_set = split_prompts([r["instruction"] for r in records], train_fraction, seed)
    counts = {"train": 0, "test": 0}
    with open(out_train, "w", encoding="utf-8") as ftr, open(out_test, "w", encoding="utf-8") as fte:
        for rec in records:
            row = {"prompt": rec["instruction"], "response": rec["output"],
                   "generator": rec.get("generator"), "dataset": rec.get("dataset")}
            side = "train" if rec["instruction"] in train_set else "test"
            (ftr if side == "train" else fte).write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[side] += 1
    return counts
