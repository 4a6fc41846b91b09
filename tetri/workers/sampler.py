"""Turn a step's logits into tokens, one row per sequence that samples this step.

Order of operations per row (vLLM's): penalties (repetition on prompt + output, presence
and frequency on output) -> min_tokens masks EOS and stop ids -> logprobs are taken from
these processed logits before temperature -> greedy argmax, or temperature, top-k, top-p,
min-p and a draw.

Seeded draws are stateless: the draw for output position i of choice c of a request with
seed s uses a generator seeded from (s, c, i). The same seed therefore gives the same text
whichever worker, batch or mode samples it (prefill samples the first token, decode the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetri.types import SamplingParams, TokenLogprob

_MASK64 = (1 << 63) - 1


@dataclass
class SampleRow:
    params: SamplingParams
    output_token_ids: list[int]
    prompt_token_ids: list[int]
    choice: int = 0


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self._generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[TokenLogprob | None]]:
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

    def _process_row(self, logits: torch.Tensor, i: int, row: SampleRow) -> None:
        p = row.params
        if p.has_penalties and (row.output_token_ids or p.repetition_penalty != 1.0):
            _apply_penalties(logits[i], row)
        if len(row.output_token_ids) < p.min_tokens:
            vocab = logits.shape[-1]
            banned = [t for t in (*p.stop_token_ids, *(() if p.ignore_eos else self.eos_token_ids)) if t < vocab]
            if banned:
                logits[i, banned] = -float("inf")

    def _draw(self, row_logits: torch.Tensor, row: SampleRow) -> int:
        p = row.params
        x = row_logits / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, -float("inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = (cum - sorted_p) > p.top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0.0))
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        total = float(probs.sum())
        if not (total > 0.0 and total < float("inf")):  # degenerate (e.g. extreme penalties): fall back to greedy
            return int(torch.argmax(torch.nan_to_num(row_logits, nan=-float("inf"))))
        gen = self._generator
        if p.seed is not None:
            key = hash((p.seed, row.choice, len(row.output_token_ids))) & _MASK64
            gen = torch.Generator().manual_seed(key)
        return int(torch.multinomial(probs, 1, generator=gen))


def _apply_penalties(row_logits: torch.Tensor, row: SampleRow) -> None:
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
