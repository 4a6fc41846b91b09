"""Prompt logprobs: score a prefill segment's rows against the prompt tokens that follow them.

A segment that carries `score_ids` asks for row j's distribution to be evaluated at
`score_ids[j]` (the prompt token after row j's token): its logprob, its 1-based rank, and the
top-k alternatives. The rows' logits are computed in slices, so a long prompt never holds more
than `SLICE_ROWS` full-vocabulary rows at once. Logprobs are the model's raw distribution (no
penalties, temperature or bias: those belong to sampling, not to the prompt).
"""

from __future__ import annotations

import torch

from tetri.types import TokenLogprob

SLICE_ROWS = 128


def row_begins(segments) -> list[int]:
    """First flattened row of each segment, in `ModelRunner.build`'s order (single-token
    segments first, then the rest, each group in segment order)."""
    begins = [0] * len(segments)
    order = [i for i, s in enumerate(segments) if len(s.token_ids) == 1]
    order += [i for i, s in enumerate(segments) if len(s.token_ids) != 1]
    row = 0
    for i in order:
        begins[i] = row
        row += len(segments[i].token_ids)
    return begins


@torch.inference_mode()
def score_segments(model, hidden: torch.Tensor, segments) -> list[list[TokenLogprob] | None]:
    """Per segment: its rows' TokenLogprobs against `score_ids` (None where it asked for none)."""
    begins = row_begins(segments)
    out: list[list[TokenLogprob] | None] = []
    for seg, begin in zip(segments, begins):
        ids = getattr(seg, "score_ids", None)
        if not ids:
            out.append(None if ids is None else [])
            continue
        scores: list[TokenLogprob] = []
        for lo in range(0, len(ids), SLICE_ROWS):
            part = ids[lo:lo + SLICE_ROWS]
            logits = model.compute_logits(hidden[begin + lo:begin + lo + len(part)]).float()
            scores.extend(_score(torch.log_softmax(logits, dim=-1), part, seg.score_top))
        out.append(scores)
    return out


def _score(logprobs: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    target_t = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, target_t)
    ranks = (logprobs > chosen).sum(dim=1).add_(1).tolist()
    chosen_l = chosen.squeeze(1).tolist()
    if top:
        vals, idx = torch.topk(logprobs, top, dim=1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in targets]
    return [TokenLogprob(t, lp, alts, rank) for t, lp, alts, rank in zip(targets, chosen_l, tops, ranks)]


def score_fields(prompt_ids: list[int], start: int, num_tokens: int, params) -> dict:
    """Segment fields for a prompt piece [start, start + num_tokens) of a request that asked
    for prompt logprobs (row j predicts prompt token start + j + 1); {} otherwise."""
    if params.prompt_logprobs is None or start >= len(prompt_ids):
        return {}
    return {"score_ids": prompt_ids[start + 1:start + num_tokens + 1], "score_top": params.prompt_logprobs}
