"""Output-length predictor interface (TetriInfer §3.3.2, papers.md §1.4c), pure code.

A predictor classifies a request's output length into a bucket of `bucket_tokens` tokens:
bucket k covers [k * bucket_tokens, (k + 1) * bucket_tokens). Policies use the LOW end of the
bucket as the resource estimate (`ReqInfo.predicted_low_tokens`), as the paper does.

    NonePredictor    always None (prediction-free policies)
    OraclePredictor  the true length, where a benchmark supplies it (upper bound on what
                     prediction can buy)
A trained model (`tetri.predictor.model.LearnedPredictor`) implements the same interface;
the spec strings (`none | oracle | model:DIR`) are parsed by `tetri.predictor.registry`, so
the dependency runs one way: the model package imports this module, never the reverse.

`predict(req, features=None)` returns a `Prediction` or None when nothing can be said.
`features` is what the caller knows beyond `ReqInfo`: a mapping that may hold
`expected_output_tokens` (oracle), `prompt` (prompt text, for a text model) or `hidden`
(the last-layer hidden state of the final prompt token, for a probe model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tetri.sched.load import ReqInfo

@dataclass(frozen=True)
class Prediction:
    bucket: int
    low_tokens: int
    high_tokens: int
    """Exclusive upper end of the bucket."""


class LengthPredictor(Protocol):
    bucket_tokens: int

    def predict(self, req: ReqInfo, features: Mapping[str, Any] | None = None) -> Prediction | None: ...


def bucket_of(tokens: int, bucket_tokens: int) -> int:
    """Bucket index of an output length: floor(tokens / bucket_tokens), >= 0."""
    if bucket_tokens < 1:
        raise ValueError("bucket_tokens must be >= 1")
    return max(0, tokens) // bucket_tokens


def prediction_for_bucket(bucket: int, bucket_tokens: int) -> Prediction:
    return Prediction(bucket, bucket * bucket_tokens, (bucket + 1) * bucket_tokens)


def with_prediction(req: ReqInfo, pred: Prediction | None) -> ReqInfo:
    """A copy of `req` carrying the prediction's range (unchanged when pred is None)."""
    if pred is None:
        return req
    return ReqInfo(req.req_id, req.prompt_tokens, req.max_tokens, pred.low_tokens,
                   pred.high_tokens, req.arrival_s, req.priority)


class NonePredictor:
    """No prediction: policies fall back to their prediction-free behaviour."""

    def __init__(self, bucket_tokens: int = 200) -> None:
        self.bucket_tokens = bucket_tokens

    def predict(self, req: ReqInfo, features: Mapping[str, Any] | None = None) -> Prediction | None:
        return None


class OraclePredictor:
    """The true output length, bucketed. Looked up, in order: `features["expected_output_tokens"]`,
    the `lengths` mapping by req_id, an `expected_output_tokens` attribute of `req`. Capped
    by `req.max_tokens` (the request cannot run past it). None when unknown."""

    def __init__(self, bucket_tokens: int = 200, lengths: Mapping[str, int] | None = None) -> None:
        if bucket_tokens < 1:
            raise ValueError("bucket_tokens must be >= 1")
        self.bucket_tokens = bucket_tokens
        self.lengths: dict[str, int] = dict(lengths or {})

    def set_length(self, req_id: str, tokens: int) -> None:
        self.lengths[req_id] = tokens

    def forget(self, req_id: str) -> None:
        self.lengths.pop(req_id, None)

    def _true_tokens(self, req: ReqInfo, features: Mapping[str, Any] | None) -> int | None:
        if features and features.get("expected_output_tokens") is not None:
            return int(features["expected_output_tokens"])
        if req.req_id in self.lengths:
            return self.lengths[req.req_id]
        value = getattr(req, "expected_output_tokens", None)
        return None if value is None else int(value)

    def predict(self, req: ReqInfo, features: Mapping[str, Any] | None = None) -> Prediction | None:
        tokens = self._true_tokens(req, features)
        if tokens is None:
            return None
        if req.max_tokens > 0:
            tokens = min(tokens, req.max_tokens)
        return prediction_for_bucket(bucket_of(tokens, self.bucket_tokens), self.bucket_tokens)

