"""Length-bucket classifiers, their on-disk format, and the `LearnedPredictor` wrapper.

Two kinds, named by `meta.json["kind"]`:
  text   hashed n-gram bag of the prompt (`features.py`) -> EmbeddingBag (a linear layer on
         the sparse bag) + dense length features -> [ReLU hidden layer] -> bucket logits.
  probe  a float vector (the served model's last-layer hidden state of the final prompt
         token) -> standardised -> linear or 1-hidden-layer MLP -> bucket logits.

A saved model is a directory: `meta.json` (kind, bucket_tokens, num_buckets, feature config,
hidden_dim, majority bucket, label counts, length unit, ...) and `weights.safetensors`
(tensors only; no pickle anywhere). The top bucket is open-ended: it also stands for every
length beyond it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tetri.predictor.features import DENSE_DIM, FeatureConfig, batch_features
from tetri.sched.predictor import Prediction, prediction_for_bucket

META_FILE = "meta.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1


class TextClassifier(nn.Module):
    def __init__(self, num_hashes: int, num_buckets: int, hidden_dim: int = 0) -> None:
        super().__init__()
        width = hidden_dim if hidden_dim > 0 else num_buckets
        self.hidden_dim = hidden_dim
        self.bag = nn.EmbeddingBag(num_hashes, width, mode="sum")
        nn.init.zeros_(self.bag.weight)
        self.dense = nn.Linear(DENSE_DIM, width)
        self.out = nn.Linear(hidden_dim, num_buckets) if hidden_dim > 0 else None

    def forward(self, idx, offsets, weights, dense):
        h = self.bag(idx, offsets, per_sample_weights=weights) + self.dense(dense)
        if self.out is None:
            return h
        return self.out(torch.relu(h))


class ProbeClassifier(nn.Module):
    def __init__(self, input_dim: int, num_buckets: int, hidden_dim: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("std", torch.ones(input_dim))
        if hidden_dim > 0:
            self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_buckets))
        else:
            self.net = nn.Sequential(nn.Linear(input_dim, num_buckets))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def save_model(out_dir: str | Path, module: nn.Module, meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    full = {**meta, "format_version": FORMAT_VERSION}
    (out / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out


def build_module(meta: dict) -> nn.Module:
    if meta["kind"] == "text":
        cfg = FeatureConfig.from_json(meta["feature_config"])
        return TextClassifier(cfg.num_hashes, meta["num_buckets"], meta.get("hidden_dim", 0))
    if meta["kind"] == "probe":
        return ProbeClassifier(meta["input_dim"], meta["num_buckets"], meta.get("hidden_dim", 0))
    raise ValueError(f"unknown predictor kind {meta['kind']!r}")


class LearnedPredictor:
    """A trained classifier behind the `tetri.sched.predictor.LengthPredictor` interface."""

    def __init__(self, module: nn.Module, meta: dict) -> None:
        self.module = module.eval()
        self.meta = meta
        self.kind: str = meta["kind"]
        self.bucket_tokens: int = int(meta["bucket_tokens"])
        self.num_buckets: int = int(meta["num_buckets"])
        self.feature_config = FeatureConfig.from_json(meta["feature_config"]) if self.kind == "text" else None

    def save(self, out_dir: str | Path) -> Path:
        return save_model(out_dir, self.module, self.meta)

    def _pred(self, bucket: int) -> Prediction:
        return prediction_for_bucket(int(bucket), self.bucket_tokens)

    @torch.no_grad()
    def logits_text(self, prompts: list[str], generators: list[str | None] | None = None) -> torch.Tensor:
        if self.kind != "text":
            raise TypeError("this predictor is a hidden-state probe; use predict_from_hidden")
        if generators is None:
            generators = [self.meta.get("default_generator")] * len(prompts)
        idx, off, val, dense = batch_features(prompts, self.feature_config, generators)
        return self.module(torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(val),
                           torch.from_numpy(dense))

    @torch.no_grad()
    def logits_hidden(self, vecs: Any) -> torch.Tensor:
        if self.kind != "probe":
            raise TypeError("this predictor reads prompt text; use predict_text")
        x = torch.as_tensor(np.asarray(vecs, dtype=np.float32))
        return self.module(x.reshape(-1, x.shape[-1]))

    def predict_buckets_text(self, prompts: list[str], generators: list[str | None] | None = None) -> list[int]:
        if not prompts:
            return []
        return self.logits_text(prompts, generators).argmax(dim=-1).tolist()

    def predict_buckets_hidden(self, vecs: Any) -> list[int]:
        return self.logits_hidden(vecs).argmax(dim=-1).tolist()

    def predict_text(self, prompt: str, generator: str | None = None) -> Prediction:
        gens = None if generator is None else [generator]
        return self._pred(self.predict_buckets_text([prompt], gens)[0])

    def predict_from_hidden(self, vec: Any) -> Prediction:
        return self._pred(self.predict_buckets_hidden(vec)[0])

    def predict(self, req, features: Mapping[str, Any] | None = None) -> Prediction | None:
        """`features["prompt"]` (text kind) or `features["hidden"]` (probe kind); None when
        the needed feature is missing."""
        if not features:
            return None
        if self.kind == "text" and features.get("prompt") is not None:
            return self.predict_text(str(features["prompt"]), features.get("generator"))
        if self.kind == "probe" and features.get("hidden") is not None:
            return self.predict_from_hidden(features["hidden"])
        return None


class JointPredictor:
    """A text model and a probe trained on the same rows, as one predictor: their
    log-probabilities summed (a product of experts), `probe_weight` scaling the probe's.
    Saved as `meta.json` (kind "joint") with the two parts in `text/` and `probe/`. With
    only one of prompt text and hidden state at hand it answers with that part alone."""

    kind = "joint"

    def __init__(self, text: LearnedPredictor, probe: LearnedPredictor, probe_weight: float = 1.0) -> None:
        if (text.kind, probe.kind) != ("text", "probe"):
            raise ValueError("a joint predictor needs a text model and a probe")
        if (text.bucket_tokens, text.num_buckets) != (probe.bucket_tokens, probe.num_buckets):
            raise ValueError("the text model and the probe must share bucket_tokens and num_buckets")
        self.text, self.probe, self.probe_weight = text, probe, probe_weight
        self.bucket_tokens = text.bucket_tokens
        self.num_buckets = text.num_buckets
        self.meta = {"kind": "joint", "bucket_tokens": self.bucket_tokens, "num_buckets": self.num_buckets,
                     "majority_bucket": text.meta["majority_bucket"], "label_counts": text.meta["label_counts"],
                     "probe_weight": probe_weight, "parts": ["text", "probe"]}

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        self.text.save(out / "text")
        self.probe.save(out / "probe")
        (out / META_FILE).write_text(json.dumps({**self.meta, "format_version": FORMAT_VERSION}, indent=2,
                                                sort_keys=True) + "\n")
        return out

    def predict_buckets(self, prompts: list[str], vecs: Any) -> list[int]:
        if not prompts:
            return []
        logp = torch.log_softmax(self.text.logits_text(prompts), dim=-1)
        logp = logp + self.probe_weight * torch.log_softmax(self.probe.logits_hidden(vecs), dim=-1)
        return logp.argmax(dim=-1).tolist()

    def predict(self, req, features: Mapping[str, Any] | None = None) -> Prediction | None:
        features = features or {}
        prompt, hidden = features.get("prompt"), features.get("hidden")
        if prompt is None or hidden is None:
            return self.text.predict(req, features) if prompt is not None else self.probe.predict(req, features)
        bucket = self.predict_buckets([str(prompt)], [hidden])[0]
        return prediction_for_bucket(int(bucket), self.bucket_tokens)


def load_predictor(model_dir: str | Path) -> LearnedPredictor | JointPredictor:
    path = Path(model_dir)
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported predictor format {meta.get('format_version')!r}")
    if meta.get("kind") == "joint":
        return JointPredictor(load_predictor(path / "text"), load_predictor(path / "probe"),
                              float(meta.get("probe_weight", 1.0)))
    module = build_module(meta)
    module.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return LearnedPredictor(module, meta)
