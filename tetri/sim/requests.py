"""Simulated requests: their state, the length prediction they carry, and their records.

A request's KV on a worker covers `kv_tokens` = prompt + generated - 1 tokens (the newest
token's KV is written by the next decode step), so a decode step needs room for
prompt + generated tokens: the same bookkeeping as the real mixed and decode cores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tetri.bench.records import RequestRecord
from tetri.sched.decode_policy import DecodeReqView
from tetri.sched.load import ReqInfo
from tetri.predictor.registry import make_predictor
from tetri.sched.predictor import prediction_for_bucket, with_prediction


@dataclass(eq=False)
class SimRequest:
    req_id: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    max_tokens: int
    info: ReqInfo
    token_times_s: list[float] = field(default_factory=list)
    generated_tokens: int = 0
    """len(token_times_s), kept as a field: the decode loop reads it constantly."""
    done_s: float | None = None
    error: str | None = None
    recompute: bool = False
    """Preempted: its KV was dropped and must be re-prefilled (prompt + generated - 1)."""
    prefill_worker: int | None = None
    decode_worker: int | None = None
    handoff_s: float = 0.0
    hash_ids: tuple[int, ...] = ()
    """Trace prefix-block ids (`tetri.sim.prefix`); () without prefix information."""
    computed_tokens: int = 0
    """Prefill: prompt tokens whose KV is on the prefill worker (cached or computed)."""
    block_keys: list = field(default_factory=list)
    """Prefix caching: the block hashes of the prompt's cacheable blocks (`front_adapter`)."""

    @property
    def remaining_tokens(self) -> int:
        return self.output_tokens - self.generated_tokens

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV the request has (or will have after its prefill)."""
        return self.prompt_tokens + max(0, self.generated_tokens - 1)

    @property
    def predicted_low_tokens(self) -> int | None:
        return self.info.predicted_low_tokens

    def view(self, held_blocks: int) -> DecodeReqView:
        """The decode policies' view: context = prompt + generated (as the real decode core)."""
        return DecodeReqView(self.req_id, self.prompt_tokens + self.generated_tokens, self.generated_tokens,
                             self.max_tokens, self.info.predicted_low_tokens, self.arrival_s, held_blocks)

    def emit(self, now: float) -> bool:
        """One output token at `now`; True when that was the last one."""
        self.token_times_s.append(now)
        self.generated_tokens += 1
        if self.generated_tokens >= self.output_tokens:
            self.done_s = now
            return True
        return False

    def record(self) -> RequestRecord:
        if self.error is not None or self.done_s is None:
            return RequestRecord(prompt_tokens=self.prompt_tokens, output_tokens=self.generated_tokens, ok=False,
                                 error=self.error or "not finished", arrival_s=self.arrival_s)
        times = self.token_times_s
        return RequestRecord(prompt_tokens=self.prompt_tokens, output_tokens=len(times),
                             ttft_s=times[0] - self.arrival_s, itl_s=[b - a for a, b in zip(times, times[1:])],
                             e2e_s=times[-1] - self.arrival_s, ok=True, arrival_s=self.arrival_s)


class NoisyPredictor:
    """The real predictor (`tetri.predictor.registry`), with optional bucket noise: with
    probability `accuracy` the bucket it returns, otherwise one bucket up or down (up from
    bucket 0), modelling a ~75%-accurate classifier whose mistakes are adjacent buckets. With
    `confusion` (a measured matrix, `tetri-predictor cv`'s), the bucket is drawn from the
    true bucket's row instead: a predictor with exactly the measured error pattern."""

    def __init__(self, spec: str, rng: random.Random, accuracy: float = 1.0, bucket_tokens: int = 200,
                 confusion: tuple[tuple[int, ...], ...] | None = None) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError("predictor accuracy must be in [0, 1]")
        self.inner = make_predictor(spec, bucket_tokens)
        self.rng = rng
        self.accuracy = accuracy
        self.confusion = confusion
        self.bucket_tokens = bucket_tokens
        self.predictions = 0
        self.misses = 0

    def annotate(self, info: ReqInfo, output_tokens: int) -> ReqInfo:
        return with_prediction(info, self.predict(info, {"expected_output_tokens": output_tokens}))

    def predict(self, info: ReqInfo, features=None):
        """The `LengthPredictor` interface the front calls (the true length arrives in
        `features["expected_output_tokens"]`, from `FrontReq.expected_output_tokens`)."""
        pred = self.inner.predict(info, features)
        if pred is None:
            return None
        self.predictions += 1
        if self.confusion is not None:
            return self._from_confusion(pred.bucket)
        if self.accuracy < 1.0 and self.rng.random() >= self.accuracy:
            self.misses += 1
            step = 1 if pred.bucket == 0 or self.rng.random() < 0.5 else -1
            pred = prediction_for_bucket(pred.bucket + step, self.bucket_tokens)
        return pred


    def _from_confusion(self, true_bucket: int):
        """A bucket drawn from the true bucket's row of the measured confusion matrix (the top
        row stands for every longer length, as the predictor's open-ended top bucket)."""
        row = self.confusion[min(true_bucket, len(self.confusion) - 1)]
        if not any(row):
            return prediction_for_bucket(true_bucket, self.bucket_tokens)
        bucket = self.rng.choices(range(len(row)), weights=row)[0]
        if bucket != min(true_bucket, len(row) - 1):
            self.misses += 1
        return prediction_for_bucket(bucket, self.bucket_tokens)


def make_sim_request(index: int, prompt_tokens: int, output_tokens: int, arrival_s: float,
                     max_model_len: int, hash_ids: tuple[int, ...] = (), prefix_caching: bool = False) -> SimRequest:
    """A request whose max_tokens is what the context window leaves (not its true length, so
    no policy learns the answer from max_tokens)."""
    max_tokens = max(output_tokens, max_model_len - prompt_tokens)
    req_id = f"r{index}"
    prefix = {}
    if prefix_caching and hash_ids:
        from tetri.sim.prefix import TRACE_BLOCK_TOKENS, index_ids

        prefix = dict(prefix_hashes=index_ids(hash_ids, prompt_tokens), prefix_block_tokens=TRACE_BLOCK_TOKENS)
    info = ReqInfo(req_id, prompt_tokens, max_tokens, arrival_s=arrival_s, **prefix)
    return SimRequest(req_id, prompt_tokens, output_tokens, arrival_s, max_tokens, info,
                      hash_ids=hash_ids if prefix_caching else ())
