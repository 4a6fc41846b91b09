"""Turn a step's logits into tokens: one batched pass on the logits' device.

Order of operations (vLLM's, with OpenAI's logit_bias first):
  logit_bias added -> penalties (repetition on prompt + output, presence and frequency on
  output) -> min_tokens masks EOS and stop ids to -inf -> logprobs are taken from these
  processed logits, *before* temperature (vLLM's default "processed logits" semantics; kept
  from the per-row sampler) -> greedy rows: argmax; drawing rows: temperature, top-k, top-p,
  min-p, then the draw.

Per-row parameters are device tensors (`sampling_batch.build_step`), so rows with different
options share every kernel; nothing loops over rows doing tensor work, and the step does
exactly one device-to-host transfer (tokens, their logprobs and the top alternatives packed
into one tensor, one `.tolist()`).

The draw is an inverse CDF: a row's token is the first whose running sum of kept
probabilities (float64) exceeds `u * total`. A seeded row's `u` is a pure function of
(seed, choice, position = len(output_token_ids)) computed with integer tensor ops
(`sample_noise`), so the same seed gives the same tokens whichever worker, device, batch or
mode samples it (prefill samples the first token, decode the rest, a migrated request
continues at its position). Unseeded rows take `u` from a device generator seeded with the
worker seed. Identical logits give identical tokens; across devices, whose logits differ in
rounding anyway, a token can differ only where `u` falls within rounding of a boundary.

A row whose kept probabilities do not sum to a positive finite value (e.g. an extreme
repetition penalty made a logit infinite) falls back to the argmax of its processed logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetri.types import SamplingParams, TokenLogprob
from tetri.workers.sample_noise import uniforms
from tetri.workers.sampling_batch import Draws, Penalties, StepTensors, build_step

NEG_INF = float("-inf")


@dataclass
class SampleRow:
    params: SamplingParams
    output_token_ids: list[int]
    """Every token this choice produced so far (also before a migration): its length is the
    draw position, and the output penalties count them."""
    prompt_token_ids: list[int]
    choice: int = 0


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row of `logits` `[len(rows), vocab]`, and its logprobs where asked."""
        if not rows:
            return [], []
        step = build_step(rows, self.eos_token_ids, logits.shape[-1], logits.device)
        x = logits.to(torch.float32, copy=True)
        if step.bias is not None:
            x.index_put_(step.bias[0], step.bias[1], accumulate=True)
        if step.penalties is not None:
            _apply_penalties(x, step.penalties)
        if step.banned is not None:
            x.index_put_(step.banned, x.new_full((1,), NEG_INF))
        tokens = x.argmax(dim=-1)
        if step.draws is not None:
            d = step.draws
            if d.every_row:
                tokens = _draw(x, d, self._uniforms(d))
            else:
                tokens = tokens.index_copy(0, d.rows, _draw(x.index_select(0, d.rows), d, self._uniforms(d)))
        return _to_host(x, tokens, step, len(rows))

    def _uniforms(self, d: Draws) -> torch.Tensor:
        u = uniforms(*d.keys)
        if d.seeded is not None:
            gen = self._generators.get(u.device)
            if gen is None:
                gen = self._generators[u.device] = torch.Generator(device=u.device).manual_seed(self.seed)
            free = torch.rand(u.shape, dtype=torch.float64, device=u.device, generator=gen)
            u = torch.where(d.seeded, u, free)
        return u


def _apply_penalties(x: torch.Tensor, pen: Penalties) -> None:
    """vLLM's rules: repetition divides positive / multiplies negative logits of every token in
    prompt or output; frequency subtracts per occurrence in the output, presence once. In place
    where it can be (dividing or multiplying by exactly 1 elsewhere), so that at most two
    logits-sized temporaries live beside `x`."""
    sub = x.index_select(0, pen.rows)
    counts = torch.zeros_like(sub).index_put_(pen.out_index, torch.ones_like(pen.out_index[1], dtype=sub.dtype),
                                              accumulate=True)
    in_output = counts > 0
    seen = in_output.clone().index_put_(pen.prompt_index, torch.ones_like(pen.prompt_index[1], dtype=torch.bool))
    positive = sub > 0
    sub.div_(torch.where(seen & positive, pen.repetition, 1.0)).mul_(torch.where(seen & ~positive, pen.repetition, 1.0))
    sub -= counts.mul_(pen.frequency).add_(in_output.to(sub.dtype).mul_(pen.presence))
    x.index_copy_(0, pen.rows, sub)


def _draw(x: torch.Tensor, d: Draws, u: torch.Tensor) -> torch.Tensor:
    """Tokens `[S]` for the drawing rows' processed logits `x` `[S, vocab]` at uniforms `u`.
    Each temporary is dropped as soon as it is used: the peak is `x` and four more
    logits-sized fp32 buffers (the sort's values and int64 indices), see SAMPLER_WORKSPACE."""
    fallback = torch.nan_to_num(x, nan=NEG_INF).argmax(dim=-1)
    probs = x / d.temperature
    if d.top_k is not None:
        kth = probs.topk(d.top_k_max, dim=-1).values.gather(1, d.top_k)
        kth = kth.masked_fill(~d.top_k_cut, NEG_INF)
        probs.masked_fill_(probs < kth, NEG_INF)
    probs = torch.softmax(probs, dim=-1)
    # Over the whole vocabulary even when every row has a top-k cut: tokens tied with a row's
    # k-th logit all survive the cut (as in vLLM and the per-row sampler), and bf16 or fp16
    # logits tie often, so no fixed-size "top k_max" window is guaranteed to hold every
    # survivor. A stable sort orders ties by token id, the same on every device.
    if d.top_p is not None:  # keep the smallest prefix (by probability) that reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        del probs
        before = sorted_p.cumsum(dim=-1)
        drop = before.sub_(sorted_p) > d.top_p
        del before
        probs = torch.empty_like(sorted_p).scatter_(1, order, sorted_p.masked_fill_(drop, 0.0))
        del sorted_p, order, drop
    if d.min_p is not None:
        probs.masked_fill_(probs < d.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    pick, total = _inverse_cdf(probs, u)
    ok = (total > 0) & (total < float("inf"))  # False for NaN too
    return torch.where(ok, pick, fallback)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first column whose running sum (float64) exceeds `u * total`, and the total."""
    cum = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cum[:, -1:].contiguous()
    pick = torch.searchsorted(cum, u[:, None] * total, right=True)
    last_kept = torch.searchsorted(cum, total, right=False)  # u * total may round up to total
    return torch.minimum(pick, last_kept).squeeze(1), total.squeeze(1)


def _to_host(x: torch.Tensor, tokens: torch.Tensor, step: StepTensors,
             num_rows: int) -> tuple[list[int], list[TokenLogprob | None]]:
    """The step's single device-to-host transfer: tokens, plus (when any row asked) each row's
    token logprob and top alternatives packed beside them in one float64 tensor."""
    if not step.logprobs:
        return tokens.tolist(), [None] * num_rows
    logprobs = torch.log_softmax(x, dim=-1)
    parts = [tokens[:, None].to(torch.float64), logprobs.gather(1, tokens[:, None]).to(torch.float64)]
    n = min(step.top_logprobs, x.shape[-1])  # a vocabulary smaller than the ask has fewer alternatives
    if n:
        top_vals, top_ids = logprobs.topk(n, dim=-1)
        parts += [top_ids.to(torch.float64), top_vals.to(torch.float64)]
    packed = torch.cat(parts, dim=1).tolist()
    token_ids = [int(r[0]) for r in packed]
    out: list[TokenLogprob | None] = [None] * num_rows
    for i, top_n in step.logprobs.items():
        r, top_n = packed[i], min(top_n, n)
        out[i] = TokenLogprob(token_ids[i], r[1], [(int(t), v) for t, v in zip(r[2:2 + top_n], r[2 + n:2 + n + top_n])])
    return token_ids, out
