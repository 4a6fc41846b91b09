"""Seeded, deterministic CPU training of the length-bucket classifiers.

`train_text(prompts, output_tokens, ...)` and `train_probe(features, labels, ...)` return a
`LearnedPredictor`; call `.save(dir)` to write meta.json + weights.safetensors. Labels are
output lengths in tokens (or words; see `length_unit`), bucketed as
floor(length / bucket_tokens) and clipped to `max_buckets - 1` (the open-ended top bucket).
Training: cross-entropy, mini-batches of 64 in a seeded order, one thread (so the same seed
gives the same weights). The text model uses SGD with momentum by default: its update to a
hashed feature grows with how often the feature occurs, so frequent, general cues (e.g.
"essay", "briefly") win over the rare words a per-coordinate optimizer like Adam lets it
memorise (on AlpacaEval, 5-fold CV on the training prompts put both within noise of each
other; on a keyword-determined synthetic set SGD is exact and AdamW is not). The probe uses
AdamW on dense, standardised inputs.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from torch import nn

from tetri.predictor.features import FeatureConfig, dense_features, sparse_features
from tetri.predictor.model import LearnedPredictor, ProbeClassifier, TextClassifier


def to_buckets(lengths, bucket_tokens: int, max_buckets: int) -> list[int]:
    return [min(max(0, int(n)) // bucket_tokens, max_buckets - 1) for n in lengths]


def label_meta(buckets: list[int]) -> dict:
    counts = Counter(buckets)
    majority = min(counts, key=lambda b: (-counts[b], b)) if counts else 0
    return {"majority_bucket": int(majority),
            "label_counts": {str(b): int(c) for b, c in sorted(counts.items())},
            "num_buckets": int(max(buckets) + 1) if buckets else 1,
            "train_examples": len(buckets)}


@contextmanager
def _one_thread():
    """Train on one thread (bit-for-bit reproducible), restoring the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(module: nn.Module, batch_fn: Callable[[list[int]], tuple], labels: list[int], *, epochs: int,
        seed: int, lr: float, weight_decay: float, batch_size: int = 64, label_smoothing: float = 0.0,
        optimizer: str = "adamw") -> None:
    """Mini-batch cross-entropy training (AdamW, or SGD with momentum); batch_fn(indices) ->
    the module's inputs."""
    torch.manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    y_all = torch.tensor(labels, dtype=torch.long)
    if optimizer == "sgd":
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be sgd or adamw, got {optimizer!r}")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    module.train()
    with _one_thread():
        _epochs(module, opt, loss_fn, batch_fn, y_all, order_gen, epochs, batch_size)
    module.eval()


def _epochs(module, opt, loss_fn, batch_fn, y_all, order_gen, epochs: int, batch_size: int) -> None:
    for _ in range(epochs):
        perm = torch.randperm(len(y_all), generator=order_gen).tolist()
        for start in range(0, len(perm), batch_size):
            chunk = perm[start:start + batch_size]
            opt.zero_grad()
            loss = loss_fn(module(*batch_fn(chunk)), y_all[chunk])
            loss.backward()
            opt.step()


def _text_batch_fn(prompts, generators, cfg: FeatureConfig):
    sparse = [sparse_features(p, cfg, g) for p, g in zip(prompts, generators)]
    dense = np.stack([dense_features(p) for p in prompts])

    def batch(chunk: list[int]):
        idx = [sparse[i][0] for i in chunk]
        offsets = np.cumsum([0] + [len(a) for a in idx[:-1]]).astype(np.int64)
        return (torch.from_numpy(np.concatenate(idx)), torch.from_numpy(offsets),
                torch.from_numpy(np.concatenate([sparse[i][1] for i in chunk])),
                torch.from_numpy(dense[chunk]))

    return batch


def train_text(prompts: list[str], output_tokens: list[int], *, bucket_tokens: int = 200, epochs: int = 50,
               seed: int = 0, hidden_dim: int = 0, feature_config: FeatureConfig | None = None,
               generators: list[str | None] | None = None, lr: float = 0.5, weight_decay: float = 1e-4,
               label_smoothing: float = 0.0, max_buckets: int = 16, length_unit: str = "tokens",
               optimizer: str = "sgd", extra_meta: dict | None = None) -> LearnedPredictor:
    """Train the prompt-text classifier."""
    if len(prompts) != len(output_tokens) or not prompts:
        raise ValueError("need as many output lengths as prompts, and at least one")
    cfg = feature_config or FeatureConfig(use_generator=generators is not None)
    gens = list(generators) if generators is not None else [None] * len(prompts)
    buckets = to_buckets(output_tokens, bucket_tokens, max_buckets)
    meta = {"kind": "text", "bucket_tokens": bucket_tokens, "feature_config": cfg.to_json(),
            "hidden_dim": hidden_dim, "length_unit": length_unit, "epochs": epochs, "seed": seed,
            "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
            "max_buckets": max_buckets, **label_meta(buckets), **(extra_meta or {})}
    if cfg.use_generator:
        counts = Counter(g for g in gens if g)
        meta["default_generator"] = min(counts, key=lambda g: (-counts[g], g)) if counts else None
    torch.manual_seed(seed)
    module = TextClassifier(cfg.num_hashes, meta["num_buckets"], hidden_dim)
    fit(module, _text_batch_fn(prompts, gens, cfg), buckets, epochs=epochs, seed=seed, lr=lr,
        weight_decay=weight_decay, label_smoothing=label_smoothing, optimizer=optimizer)
    return LearnedPredictor(module, meta)


def train_probe(features: np.ndarray, labels, *, bucket_tokens: int = 200, labels_are_buckets: bool = False,
                epochs: int = 50, seed: int = 0, hidden_dim: int = 0, lr: float = 1e-2,
                weight_decay: float = 1e-3, max_buckets: int = 16, length_unit: str = "tokens",
                extra_meta: dict | None = None) -> LearnedPredictor:
    """Train the hidden-state probe. `features`: (n, d) float array, one row per prompt (the
    served model's last-layer hidden state of the final prompt token). `labels`: output
    lengths (tokens), or bucket ids when `labels_are_buckets`."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] != len(labels) or x.shape[0] == 0:
        raise ValueError("features must be (n, d) with n == len(labels) > 0")
    if labels_are_buckets:
        buckets = [min(int(b), max_buckets - 1) for b in labels]
    else:
        buckets = to_buckets(labels, bucket_tokens, max_buckets)
    meta = {"kind": "probe", "bucket_tokens": bucket_tokens, "input_dim": int(x.shape[1]),
            "feature_config": {"source": "last-layer hidden state of the final prompt token"},
            "hidden_dim": hidden_dim, "length_unit": length_unit, "epochs": epochs, "seed": seed,
            "max_buckets": max_buckets, **label_meta(buckets), **(extra_meta or {})}
    torch.manual_seed(seed)
    module = ProbeClassifier(int(x.shape[1]), meta["num_buckets"], hidden_dim)
    module.mean.copy_(x.mean(dim=0))
    module.std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6))
    fit(module, lambda chunk: (x[chunk],), buckets, epochs=epochs, seed=seed, lr=lr, weight_decay=weight_decay)
    return LearnedPredictor(module, meta)
