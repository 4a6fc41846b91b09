"""Prompt-text features: hashed word/char n-grams with log-scaled counts, plus length features.

Hashing uses crc32 (stable across processes and Python versions; `hash()` is salted). A
prompt becomes a sparse bag `(indices, weights)` into 2**hash_bits buckets: word unigrams and
bigrams (lowercased, split on non-alphanumerics), optional char n-grams, coarse log2 length
bins of the prompt (as pseudo-words, so a linear model can be non-linear in length) and,
when given, the generator name. Weights are log1p(count), L2-normalised per prompt.
A small dense vector carries log lengths.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
DENSE_DIM = 4


@dataclass(frozen=True)
class FeatureConfig:
    hash_bits: int = 16
    word_ngrams: tuple[int, ...] = (1, 2)
    char_ngrams: tuple[int, ...] = ()
    length_bins: bool = True
    use_generator: bool = False

    @property
    def num_hashes(self) -> int:
        return 1 << self.hash_bits

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "FeatureConfig":
        return cls(hash_bits=int(d["hash_bits"]), word_ngrams=tuple(d["word_ngrams"]),
                   char_ngrams=tuple(d.get("char_ngrams", ())), length_bins=bool(d.get("length_bins", True)),
                   use_generator=bool(d.get("use_generator", False)))


def words_of(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _terms(text: str, cfg: FeatureConfig, generator: str | None) -> Counter:
    words = words_of(text)
    terms: Counter = Counter()
    for n in cfg.word_ngrams:
        for i in range(len(words) - n + 1):
            terms["w%d:%s" % (n, " ".join(words[i:i + n]))] += 1
    low = text.lower()
    for n in cfg.char_ngrams:
        for i in range(len(low) - n + 1):
            terms["c%d:%s" % (n, low[i:i + n])] += 1
    if cfg.length_bins:
        terms["len_w:%d" % int(math.log2(len(words) + 1))] += 1
        terms["len_l:%d" % min(8, text.count("\n"))] += 1
        for w in words[:3]:
            terms["first:" + w] += 1
    if cfg.use_generator and generator:
        terms["gen:" + generator] += 1
    return terms


def sparse_features(text: str, cfg: FeatureConfig, generator: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hashed bag of one prompt: (int64 indices, float32 weights), L2-normalised."""
    acc: dict[int, float] = {}
    for term, count in _terms(text, cfg, generator).items():
        idx = zlib.crc32(term.encode("utf-8")) & (cfg.num_hashes - 1)
        acc[idx] = acc.get(idx, 0.0) + math.log1p(count)
    if not acc:
        acc[0] = 0.0
    idx = np.fromiter(acc.keys(), dtype=np.int64, count=len(acc))
    val = np.fromiter(acc.values(), dtype=np.float32, count=len(acc))
    norm = float(np.linalg.norm(val))
    if norm > 0:
        val /= norm
    return idx, val


def dense_features(text: str) -> np.ndarray:
    """log1p of chars, words and lines (scaled to ~[0, 1]), and a question-mark flag."""
    words = len(text.split())
    return np.array([math.log1p(len(text)) / 8.0, math.log1p(words) / 6.0,
                     math.log1p(text.count("\n")) / 3.0, float("?" in text)], dtype=np.float32)


def batch_features(texts: list[str], cfg: FeatureConfig, generators: list[str | None] | None = None):
    """EmbeddingBag inputs for many prompts: (flat indices, offsets, flat weights, dense)."""
    gens = generators or [None] * len(texts)
    idx_parts, val_parts, offsets = [], [], []
    pos = 0
    for text, gen in zip(texts, gens):
        idx, val = sparse_features(text, cfg, gen)
        offsets.append(pos)
        pos += len(idx)
        idx_parts.append(idx)
        val_parts.append(val)
    dense = np.stack([dense_features(t) for t in texts]) if texts else np.zeros((0, DENSE_DIM), np.float32)
    flat_idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    flat_val = np.concatenate(val_parts) if val_parts else np.zeros(0, np.float32)
    return flat_idx, np.asarray(offsets, dtype=np.int64), flat_val, dense
