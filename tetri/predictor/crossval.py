"""Held-back evaluation of the length predictors: K-fold by prompt, pooled metrics.

`tetri-predictor cv --data FILE.jsonl --features text|hidden|joint` trains on K-1 folds and
predicts the held-back fold, for every fold; no prompt is ever in both. Folds: the sorted
unique prompts shuffled with `random.Random(seed)`, prompt i going to fold i mod K (a
prompt's duplicates share its fold). The report pools the K held-back folds:

    accuracy, accuracy_within_one_bucket, mae_tokens, n   the model's
    majority_baseline, majority_within_one               always answering each fold's
                                                         training majority bucket
    confusion        rows = true bucket, columns = predicted (the top bucket open-ended)
    per_fold         each fold's accuracy / within-one / majority baseline

Kinds: `text` (the prompt-text classifier), `hidden` (the probe on the served model's
last hidden state), `joint` (both, their log-probabilities summed: `model.JointPredictor`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tetri.predictor.data import eval_metrics

KINDS = ("text", "hidden", "joint")


@dataclass
class LengthRecords:
    """What `--log-lengths` (or `tetri-predictor generate`) wrote: one row per response."""

    prompts: list[str]
    lengths: list[int]
    hidden: np.ndarray | None
    finish_reasons: list[str | None] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    """The raw user message where the file has one (else the prompt): what splits go by."""

    def subset(self, idx: list[int]) -> LengthRecords:
        return LengthRecords([self.prompts[i] for i in idx], [self.lengths[i] for i in idx],
                             None if self.hidden is None else self.hidden[idx],
                             [self.finish_reasons[i] for i in idx], [self.instructions[i] for i in idx])


def load_length_records(path: str | Path, need_hidden: bool = False) -> LengthRecords:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if r.get("output_tokens") is not None and r.get("prompt") is not None]
    if need_hidden:
        rows = [r for r in rows if r.get("hidden") is not None]
    if not rows:
        raise ValueError(f"{path}: no lines with `prompt` and `output_tokens`" + (" and `hidden`" if need_hidden else ""))
    hidden = None
    if all(r.get("hidden") is not None for r in rows):
        hidden = np.asarray([r["hidden"] for r in rows], dtype=np.float32)
    return LengthRecords([str(r["prompt"]) for r in rows], [int(r["output_tokens"]) for r in rows], hidden,
                         [r.get("finish_reason") for r in rows], [str(r.get("instruction") or r["prompt"]) for r in rows])


def fold_of_prompts(prompts: list[str], folds: int, seed: int) -> list[int]:
    """Fold index of each row, by prompt (see the module doc)."""
    if folds < 2:
        raise ValueError("need at least 2 folds")
    unique = sorted(set(prompts))
    random.Random(seed).shuffle(unique)
    where = {p: i % folds for i, p in enumerate(unique)}
    return [where[p] for p in prompts]


def confusion(pred_buckets: list[int], true_buckets: list[int], num_buckets: int) -> list[list[int]]:
    out = [[0] * num_buckets for _ in range(num_buckets)]
    for p, t in zip(pred_buckets, true_buckets):
        out[min(t, num_buckets - 1)][min(p, num_buckets - 1)] += 1
    return out


def train_kind(kind: str, recs: LengthRecords, idx: list[int], *, bucket_tokens: int, max_buckets: int,
               seed: int, text_epochs: int = 50, probe_epochs: int = 100, probe_weight_decay: float = 1e-1,
               probe_hidden_dim: int = 0, probe_weight: float = 1.0):
    """A predictor of `kind` trained on rows `idx`."""
    from tetri.predictor.model import JointPredictor
    from tetri.predictor.train import train_probe, train_text

    lengths = [recs.lengths[i] for i in idx]

    def text():
        return train_text([recs.prompts[i] for i in idx], lengths, bucket_tokens=bucket_tokens,
                          epochs=text_epochs, seed=seed, max_buckets=max_buckets)

    def probe():
        if recs.hidden is None:
            raise ValueError("this data has no `hidden` vectors")
        return train_probe(recs.hidden[idx], lengths, bucket_tokens=bucket_tokens, epochs=probe_epochs, seed=seed,
                           hidden_dim=probe_hidden_dim, weight_decay=probe_weight_decay, max_buckets=max_buckets)

    if kind == "text":
        return text()
    if kind == "hidden":
        return probe()
    if kind == "joint":
        return JointPredictor(text(), probe(), probe_weight)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def log_probs(pred, recs: LengthRecords, idx: list[int], width: int) -> np.ndarray:
    """(len(idx), width) bucket log-probabilities; buckets the model never saw get -inf."""
    import torch

    if pred.kind == "joint":
        lp = (torch.log_softmax(pred.text.logits_text([recs.prompts[i] for i in idx]), -1)
              + pred.probe_weight * torch.log_softmax(pred.probe.logits_hidden(recs.hidden[idx]), -1))
    elif pred.kind == "probe":
        lp = torch.log_softmax(pred.logits_hidden(recs.hidden[idx]), -1)
    else:
        lp = torch.log_softmax(pred.logits_text([recs.prompts[i] for i in idx]), -1)
    out = np.full((len(idx), width), -np.inf, dtype=np.float64)
    out[:, :lp.shape[1]] = lp.double().numpy()
    return out


def held_back_log_probs(recs: LengthRecords, kind: str, fold: list[int], *, bucket_tokens: int = 200,
                        max_buckets: int = 16, seed: int = 0, **train_kw) -> tuple[np.ndarray, list[int]]:
    """Each row's bucket log-probabilities from the model trained without its fold, and the
    majority bucket of that training set."""
    width = min(max_buckets, max(recs.lengths) // bucket_tokens + 1)
    lp = np.zeros((len(recs.lengths), width))
    majority = [0] * len(recs.lengths)
    for k in sorted(set(fold)):
        train_idx = [i for i, f in enumerate(fold) if f != k]
        test_idx = [i for i, f in enumerate(fold) if f == k]
        if not train_idx:
            raise ValueError("a fold holds every prompt: need more prompts than folds")
        pred = train_kind(kind, recs, train_idx, bucket_tokens=bucket_tokens, max_buckets=max_buckets, seed=seed,
                          **train_kw)
        lp[test_idx] = log_probs(pred, recs, test_idx, width)
        for i in test_idx:
            majority[i] = pred.meta["majority_bucket"]
    return lp, majority


def report_from(pred_buckets: list[int], majority: list[int], lengths: list[int], bucket_tokens: int,
                width: int, fold: list[int] | None = None) -> dict:
    """The module doc's report for predictions already made."""
    true_b = [min(t // bucket_tokens, width - 1) for t in lengths]
    n = len(true_b)
    report = eval_metrics(pred_buckets, lengths, bucket_tokens, width, 0)
    report["majority_baseline"] = sum(m == t for m, t in zip(majority, true_b)) / n
    report["majority_within_one"] = sum(abs(m - t) <= 1 for m, t in zip(majority, true_b)) / n
    report.update(bucket_tokens=bucket_tokens, num_buckets=width, label_counts=[true_b.count(b) for b in range(width)],
                  confusion=confusion(pred_buckets, true_b, width))
    if fold is not None:
        per_fold = []
        for k in sorted(set(fold)):
            rows = [i for i, f in enumerate(fold) if f == k]
            per_fold.append({"accuracy": sum(pred_buckets[i] == true_b[i] for i in rows) / len(rows),
                             "accuracy_within_one_bucket": sum(abs(pred_buckets[i] - true_b[i]) <= 1 for i in rows)
                             / len(rows),
                             "majority_baseline": sum(majority[i] == true_b[i] for i in rows) / len(rows),
                             "n": len(rows)})
        report["per_fold"] = per_fold
    return report


def cross_validate(recs: LengthRecords, kind: str, *, bucket_tokens: int = 200, folds: int = 5, seed: int = 0,
                   max_buckets: int = 16, **train_kw) -> dict:
    """K-fold by prompt; see the module doc for the report's fields."""
    fold = fold_of_prompts(recs.prompts, folds, seed)
    lp, majority = held_back_log_probs(recs, kind, fold, bucket_tokens=bucket_tokens, max_buckets=max_buckets,
                                       seed=seed, **train_kw)
    report = report_from(lp.argmax(axis=1).tolist(), majority, recs.lengths, bucket_tokens, lp.shape[1], fold)
    report.update(kind=kind, folds=folds, seed=seed)
    return report
