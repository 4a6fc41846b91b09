"""The per-row sampler the engine used before the batched one (tetri/workers/sampler.py at
e73b007), kept as the oracle of tests/engine/test_sampler.py. Three changes only:

- the draw: the old one called `torch.multinomial` with a generator seeded per (seed, choice,
  position). It is replaced by the batched sampler's documented draw (inverse CDF over the
  float64 running sum of the kept probabilities, at a uniform from splitmix64 of (seed, choice,
  position)), computed here per row from a pure-Python hash. No draw change can reproduce
  torch.multinomial's stream, so seeded text differs from the old sampler's; greedy does not.
- `logit_bias` (which the old sampler ignored) is added to each row's logits before anything else.
- top-p's sort is stable: probabilities that tie (bf16 and fp16 logits tie often) are ordered by
  token id, where the old unstable sort left their order, and so which tied tokens top-p keeps,
  to the implementation (it differs between CPU and CUDA).

Everything else (penalties, min_tokens masking, temperature, top-k, top-p, min-p, the greedy
fall-back for degenerate rows, logprobs) is the old code line for line.
"""

from __future__ import annotations

import torch

from tetri.types import TokenLogprob

U64 = (1 << 64) - 1


def py_mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return x ^ (x >> 31)


def py_hash(seed: int, choice: int, position: int) -> int:
    """Unsigned 64-bit twin of `tetri.workers.sample_noise.hash_keys`, in plain Python ints."""
    return py_mix64((py_mix64((py_mix64(seed & U64) + choice) & U64) + position) & U64)


def py_uniform(seed: int, choice: int, position: int) -> float:
    return (py_hash(seed, choice, position) >> 11) * 2.0**-53


class ReferenceSampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self._generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = logits.float().clone()  # processed in place below
        for i, row in enumerate(rows):
            self._process_row(logits, i, row)
        want_logprobs = [r.params.logprobs is not None for r in rows]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        tokens = torch.argmax(logits, dim=-1).tolist()
        for i, row in enumerate(rows):
            if not row.params.greedy:
                tokens[i] = self._draw(logits[i], row)
        lp_out: list[TokenLogprob | None] = []
        for i, row in enumerate(rows):
            lp_out.append(_logprob(logprobs[i], tokens[i], row.params.logprobs) if want_logprobs[i] else None)
        return tokens, lp_out

    def _process_row(self, logits: torch.Tensor, i: int, row) -> None:
        p = row.params
        vocab = logits.shape[-1]
        for tok, bias in (p.logit_bias or {}).items():  # new: OpenAI's logit_bias, first
            if tok < vocab:
                logits[i, tok] += bias
        if p.has_penalties and (row.output_token_ids or p.repetition_penalty != 1.0):
            _apply_penalties(logits[i], row)
        if len(row.output_token_ids) < p.min_tokens:
            banned = [t for t in (*p.stop_token_ids, *(() if p.ignore_eos else self.eos_token_ids)) if t < vocab]
            if banned:
                logits[i, banned] = -float("inf")

    def _draw(self, row_logits: torch.Tensor, row) -> int:
        p = row.params
        x = row_logits / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, -float("inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True, stable=True)  # new: stable
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = (cum - sorted_p) > p.top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0.0))
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        total = float(probs.sum())
        if not (total > 0.0 and total < float("inf")):  # degenerate (e.g. extreme penalties): fall back to greedy
            return int(torch.argmax(torch.nan_to_num(row_logits, nan=-float("inf"))))
        # new draw: inverse CDF at a counter-based uniform (the old one: torch.multinomial)
        if p.seed is not None:
            u = py_uniform(p.seed, row.choice, len(row.output_token_ids))
        else:
            u = float(torch.rand((), dtype=torch.float64, generator=self._generator))
        cum = probs.double().cumsum(0)
        pick = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=torch.float64), right=True))
        last_kept = int(torch.searchsorted(cum, cum[-1:], right=False))
        return min(pick, last_kept)


def _apply_penalties(row_logits: torch.Tensor, row) -> None:
    p = row.params
    out_ids = torch.tensor(row.output_token_ids, dtype=torch.long)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
        if seen.numel():
            vals = row_logits[seen]
            row_logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(out_ids, minlength=row_logits.shape[-1])[: row_logits.shape[-1]].to(row_logits.dtype)
        row_logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row_logits.dtype)


def _logprob(row_lp: torch.Tensor, token: int, top_n: int | None) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if top_n:
        vals, ids = torch.topk(row_lp, top_n)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, float(row_lp[token]), top)
