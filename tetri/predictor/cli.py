"""`tetri-predictor`: train, evaluate and prepare data for the output-length predictor.

    tetri-predictor train --data FILE.jsonl --out DIR [--bucket-tokens 200] [--tokenizer DIR]
                          [--epochs N] [--seed S] [--hidden-dim H] [--lr X] [--weight-decay X]
                          [--optimizer sgd|adamw] [--use-generator]
    tetri-predictor eval --model DIR --data FILE.jsonl [--tokenizer DIR]
        prints JSON: accuracy, accuracy_within_one_bucket, mae_tokens, majority_baseline, n
    tetri-predictor prepare-alpaca --out-train F --out-test F [--models M ...] [--split 0.8]
                                   [--seed S] [--src DIR]
    tetri-predictor generate --model DIR --out FILE.jsonl [--prompts ALPACA.json] [--limit N]
                             [--max-tokens 512] [--max-num-seqs 256] [--kv-cache-gb G] [--batch B]
                             [--resume] [--generator NAME]
        the served model's own greedy lengths + hidden states (`--log-lengths` format)
    tetri-predictor cv --data FILE.jsonl [--features text|hidden|joint] [--bucket-tokens 200]
                       [--folds 5] [--seed S] [--probe-weight-decay X] [--probe-epochs N]
        K-fold by prompt on `--log-lengths`-format data: pooled held-back metrics (JSON)
"""

from __future__ import annotations

import argparse
import json
import sys

from tetri.predictor.data import (ALPACA_DIR, DEFAULT_ALPACA_MODELS, LengthCounter, eval_metrics,
                                  load_examples, prepare_alpaca)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetri-predictor", description="Output-length bucket predictor")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the prompt-text classifier on JSONL")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--bucket-tokens", type=int, default=200)
    t.add_argument("--tokenizer", default=None, help="HF tokenizer dir to count response tokens")
    t.add_argument("--features", choices=("text", "hidden"), default="text",
                   help="text: the prompt; hidden: each line's `hidden` vector (from `tetri-serve --log-lengths`)")
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hidden-dim", type=int, default=0, help="0: linear; >0: one ReLU hidden layer")
    t.add_argument("--lr", type=float, default=0.5)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    t.add_argument("--use-generator", action="store_true",
                   help="add the record's `generator` as a feature (train on many models' outputs)")
    e = sub.add_parser("eval", help="evaluate a saved model on JSONL")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--tokenizer", default=None, help="default: the tokenizer used in training, if any")
    e.add_argument("--generator", default=None, help="override every record's generator feature")
    a = sub.add_parser("prepare-alpaca", help="AlpacaEval outputs -> train/test JSONL split by prompt")
    a.add_argument("--out-train", required=True)
    a.add_argument("--out-test", required=True)
    a.add_argument("--models", nargs="+", default=list(DEFAULT_ALPACA_MODELS))
    a.add_argument("--split", type=float, default=0.8)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--src", default=str(ALPACA_DIR))
    g = sub.add_parser("generate", help="the model's own greedy output lengths and hidden states, as JSONL")
    g.add_argument("--model", required=True, help="HF checkpoint dir the engine loads")
    g.add_argument("--out", required=True)
    g.add_argument("--prompts", default=None, help="AlpacaEval model-outputs JSON (its instructions)")
    g.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--kv-cache-gb", type=float, default=None)
    g.add_argument("--batch", type=int, default=0, help="prompts per engine call, written before the next (0: all at once)")
    g.add_argument("--resume", action="store_true", help="append to --out, skipping the prompts it already holds")
    g.add_argument("--generator", default=None, help="the `generator` field (default: the model dir's name)")
    c = sub.add_parser("cv", help="K-fold cross-validation by prompt (held-back metrics, confusion matrix)")
    c.add_argument("--data", required=True, help="JSONL with prompt, output_tokens[, hidden]")
    c.add_argument("--features", choices=("text", "hidden", "joint"), default="text")
    c.add_argument("--bucket-tokens", type=int, default=200)
    c.add_argument("--max-buckets", type=int, default=16)
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--text-epochs", type=int, default=50)
    c.add_argument("--probe-epochs", type=int, default=100)
    c.add_argument("--probe-weight-decay", type=float, default=1e-1)
    c.add_argument("--probe-hidden-dim", type=int, default=0)
    return p


def _cv(args) -> dict:
    from tetri.predictor.crossval import cross_validate, load_length_records

    recs = load_length_records(args.data, need_hidden=args.features != "text")
    return cross_validate(recs, args.features, bucket_tokens=args.bucket_tokens, folds=args.folds, seed=args.seed,
                          max_buckets=args.max_buckets, text_epochs=args.text_epochs, probe_epochs=args.probe_epochs,
                          probe_weight_decay=args.probe_weight_decay, probe_hidden_dim=args.probe_hidden_dim)


def _hidden_records(path: str) -> tuple[list[list[float]], list[int]]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if r.get("hidden") is not None and r.get("output_tokens") is not None]
    if not rows:
        raise SystemExit(f"{path}: no lines with both `hidden` and `output_tokens`")
    return [r["hidden"] for r in rows], [int(r["output_tokens"]) for r in rows]


def _train(args) -> dict:
    from tetri.predictor.features import FeatureConfig
    from tetri.predictor.train import train_probe, train_text

    if args.features == "hidden":
        import numpy as np

        vecs, lengths = _hidden_records(args.data)
        pred = train_probe(np.asarray(vecs, dtype=np.float32), lengths, bucket_tokens=args.bucket_tokens,
                           epochs=args.epochs, seed=args.seed, hidden_dim=args.hidden_dim,
                           extra_meta={"train_data": str(args.data)})
        pred.save(args.out)
        return {"out": str(args.out), "n": len(lengths), "kind": "probe", "num_buckets": pred.num_buckets,
                "majority_bucket": pred.meta["majority_bucket"]}

    data = load_examples(args.data, LengthCounter(args.tokenizer))
    cfg = FeatureConfig(use_generator=args.use_generator)
    gens = data.generators if args.use_generator else None
    pred = train_text(data.prompts, data.lengths, bucket_tokens=args.bucket_tokens, epochs=args.epochs,
                      seed=args.seed, hidden_dim=args.hidden_dim, feature_config=cfg, generators=gens,
                      lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
                      length_unit=data.length_unit,
                      extra_meta={"tokenizer": args.tokenizer, "train_data": str(args.data)})
    pred.save(args.out)
    return {"out": str(args.out), "n": len(data.prompts), "length_unit": data.length_unit,
            "num_buckets": pred.num_buckets, "majority_bucket": pred.meta["majority_bucket"]}


def _eval(args) -> dict:
    from tetri.predictor.model import load_predictor

    pred = load_predictor(args.model)
    if pred.kind == "probe":
        vecs, lengths = _hidden_records(args.data)
        buckets = pred.predict_buckets_hidden(vecs)
        return eval_metrics(buckets, lengths, pred.bucket_tokens, pred.num_buckets, pred.meta["majority_bucket"])
    data = load_examples(args.data, LengthCounter(args.tokenizer or pred.meta.get("tokenizer")))
    gens = None
    if pred.feature_config.use_generator:
        gens = [args.generator or g or pred.meta.get("default_generator") for g in data.generators]
    buckets = pred.predict_buckets_text(data.prompts, gens)
    return eval_metrics(buckets, data.lengths, pred.bucket_tokens, pred.num_buckets, pred.meta["majority_bucket"])


def _generate(args) -> dict:
    from tetri.predictor.generate import ALPACA_INSTRUCTIONS, alpaca_instructions, generate_lengths

    items = alpaca_instructions(args.prompts or ALPACA_INSTRUCTIONS)
    if args.limit > 0:
        items = items[:args.limit]
    return generate_lengths(args.model, items, args.out, max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                            kv_cache_gb=args.kv_cache_gb, batch=args.batch, resume=args.resume,
                            generator=args.generator, log=lambda text: print(text, file=sys.stderr, flush=True))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "train":
        result = _train(args)
    elif args.cmd == "eval":
        result = _eval(args)
    elif args.cmd == "generate":
        result = _generate(args)
    elif args.cmd == "cv":
        result = _cv(args)
    else:
        result = prepare_alpaca(args.out_train, args.out_test, args.models, args.split, args.seed, args.src)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
