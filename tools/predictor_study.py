"""The length predictor on held-back prompts: text model, hidden-state probe, and both.

Input: `tetri-predictor generate` (or `tetri-serve --log-lengths`) JSONL of ONE served
model's own responses: prompt, output_tokens (its own tokens), hidden. For each bucket width:

1. split by prompt (`instruction` when the file has it): `split_prompts(.., 0.8, seed)`, the
   same split `tetri-predictor prepare-alpaca` makes, so AlpacaEval's test prompts are the
   ones the Llama-3-8B baseline was scored on;
2. choose hyperparameters by 5-fold CV on the TRAINING prompts only: the probe's weight
   decay (and hidden layer), the joint model's probe weight;
3. train each chosen model on all training prompts, score it once on the test prompts;
4. also pool a 5-fold CV over every prompt at the chosen settings (n = all rows: a steadier
   figure, and the confusion matrix `tetri-sim --predictor-confusion` reads).

    python tools/predictor_study.py --data smollm2_alpaca_512.jsonl --bucket-tokens 200 100 \\
        --out study.json --confusion-out confusion_200.json

`--relabel OUTPUTS.json` (an AlpacaEval model-outputs file) swaps the labels for THAT
model's response lengths (whitespace words, or tokens with `--tokenizer DIR`) and the text
model's input for the raw instruction, keeping the hidden states: a probe on the small
served model's embedding of the prompt predicting another model's lengths (TetriInfer's
small-LM predictor, here a frozen probe rather than a fine-tune).

Prints a table per width; `--out` writes every figure as JSON; `--confusion-out` writes the
pooled CV report, at the FIRST width, of the kind that scored best in step 2's CV on the
training prompts (a `tetri-predictor cv`-shaped JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tetri.predictor.crossval import (LengthRecords, fold_of_prompts, held_back_log_probs, load_length_records,
                                      log_probs, report_from, train_kind)
from tetri.predictor.data import split_prompts

PROBE_GRID = ({"probe_weight_decay": 1e-2}, {"probe_weight_decay": 1e-1}, {"probe_weight_decay": 1.0},
              {"probe_weight_decay": 1e-1, "probe_hidden_dim": 32})
JOINT_WEIGHTS = (0.5, 1.0, 2.0)


def _score(lp: np.ndarray, recs: LengthRecords, bucket_tokens: int) -> tuple[float, float]:
    true_b = np.minimum(np.asarray(recs.lengths) // bucket_tokens, lp.shape[1] - 1)
    pred = lp.argmax(axis=1)
    return float((pred == true_b).mean()), float((np.abs(pred - true_b) <= 1).mean())


def choose(train: LengthRecords, bucket_tokens: int, seed: int, epochs: dict, folds: int = 5) -> dict:
    """Settings picked by 5-fold CV on the training prompts (accuracy, then within-one)."""
    fold = fold_of_prompts(train.instructions, folds, seed)
    kw = dict(bucket_tokens=bucket_tokens, seed=seed, **epochs)
    text_lp, _ = held_back_log_probs(train, "text", fold, **kw)
    probes = []
    for grid in PROBE_GRID:
        lp, _ = held_back_log_probs(train, "hidden", fold, **kw, **grid)
        probes.append((_score(lp, train, bucket_tokens), grid, lp))
    (probe_score, probe_grid, probe_lp) = max(probes, key=lambda p: p[0])
    joints = [(_score(text_lp + w * probe_lp, train, bucket_tokens), w) for w in JOINT_WEIGHTS]
    joint_score, joint_w = max(joints)
    return {"text": {}, "hidden": dict(probe_grid), "joint": {**probe_grid, "probe_weight": joint_w},
            "cv_train": {"text": _score(text_lp, train, bucket_tokens), "hidden": probe_score, "joint": joint_score,
                         "probe_grid": [[p[1], p[0]] for p in probes], "joint_weights": [[w, s] for s, w in joints]}}


def study_width(recs: LengthRecords, bucket_tokens: int, seed: int, epochs: dict, folds: int = 5) -> dict:
    train_set = split_prompts(recs.instructions, 0.8, seed)
    train_idx = [i for i, p in enumerate(recs.instructions) if p in train_set]
    test_idx = [i for i, p in enumerate(recs.instructions) if p not in train_set]
    train, test = recs.subset(train_idx), recs.subset(test_idx)
    chosen = choose(train, bucket_tokens, seed, epochs, folds)
    width = min(16, max(recs.lengths) // bucket_tokens + 1)
    out = {"bucket_tokens": bucket_tokens, "folds": folds, "n_train": len(train_idx), "n_test": len(test_idx),
           "chosen": chosen,
           "test": {}, "cv_all": {}}
    fold_all = fold_of_prompts(recs.instructions, folds, seed)
    for kind in ("text", "hidden", "joint"):
        settings = chosen[kind]
        pred = train_kind(kind, train, list(range(len(train_idx))), bucket_tokens=bucket_tokens, max_buckets=16,
                          seed=seed, **epochs, **settings)
        lp = log_probs(pred, test, list(range(len(test_idx))), width)
        majority = [pred.meta["majority_bucket"]] * len(test_idx)
        out["test"][kind] = report_from(lp.argmax(axis=1).tolist(), majority, test.lengths, bucket_tokens, width)
        lp_all, maj_all = held_back_log_probs(recs, kind, fold_all, bucket_tokens=bucket_tokens, seed=seed,
                                              **epochs, **settings)
        out["cv_all"][kind] = report_from(lp_all.argmax(axis=1).tolist(), maj_all, recs.lengths, bucket_tokens,
                                          lp_all.shape[1], fold_all)
    return out


def print_width(res: dict) -> None:
    b = res["bucket_tokens"]
    print(f"\n{b}-token buckets: train {res['n_train']} prompts, test {res['n_test']}; chosen "
          f"probe {res['chosen']['hidden']}, joint probe weight {res['chosen']['joint']['probe_weight']}")
    print(f"| model | test acc | test within-1 | {res['folds']}-fold CV acc (all) | CV within-1 |")
    print("|---|---:|---:|---:|---:|")
    t0, c0 = res["test"]["text"], res["cv_all"]["text"]
    print(f"| majority bucket | {t0['majority_baseline']:.3f} | {t0['majority_within_one']:.3f} | "
          f"{c0['majority_baseline']:.3f} | {c0['majority_within_one']:.3f} |")
    for kind in ("text", "hidden", "joint"):
        t, c = res["test"][kind], res["cv_all"][kind]
        print(f"| {kind} | {t['accuracy']:.3f} | {t['accuracy_within_one_bucket']:.3f} | {c['accuracy']:.3f} | "
              f"{c['accuracy_within_one_bucket']:.3f} |")
    print(f"label counts (all): {res['cv_all']['text']['label_counts']}")


def relabel(recs: LengthRecords, outputs_json: str, tokenizer_dir: str | None) -> LengthRecords:
    """Rows whose instruction the outputs file answers, labelled with that answer's length."""
    from tetri.predictor.data import LengthCounter

    count = LengthCounter(tokenizer_dir)
    with open(outputs_json, encoding="utf-8") as f:
        answers = {r["instruction"]: r["output"] for r in json.load(f)}
    idx = [i for i, p in enumerate(recs.instructions) if p in answers]
    sub = recs.subset(idx)
    return LengthRecords(list(sub.instructions), [count(answers[p]) for p in sub.instructions], sub.hidden,
                         [None] * len(idx), list(sub.instructions))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="predictor_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--bucket-tokens", type=int, nargs="+", default=[200])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5, help="for both the settings search and the pooled CV")
    p.add_argument("--text-epochs", type=int, default=50)
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--relabel", help="AlpacaEval model-outputs JSON: predict that model's lengths instead")
    p.add_argument("--tokenizer", help="with --relabel: count its responses in this tokenizer's tokens (default words)")
    p.add_argument("--out", help="write every figure here (JSON)")
    p.add_argument("--confusion-out", help="pooled CV report of the best model at the first width")
    args = p.parse_args(argv)
    recs = load_length_records(args.data, need_hidden=True)
    if args.relabel:
        recs = relabel(recs, args.relabel, args.tokenizer)
    epochs = {"text_epochs": args.text_epochs, "probe_epochs": args.probe_epochs}
    results = []
    for b in args.bucket_tokens:
        results.append(study_width(recs, b, args.seed, epochs, args.folds))
        print_width(results[-1])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.confusion_out:
        picked_on = results[0]["chosen"]["cv_train"]  # picked on the training prompts' CV, not on the report
        best = max(("text", "hidden", "joint"), key=lambda k: picked_on[k])
        first = results[0]["cv_all"]
        Path(args.confusion_out).write_text(json.dumps({**first[best], "kind": best}, indent=1) + "\n")
        print(f"\nconfusion of `{best}` ({args.bucket_tokens[0]}-token buckets) -> {args.confusion_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
