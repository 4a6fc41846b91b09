"""A step's per-row sampling parameters as device tensors, built from the rows' host-side
params in one pass and uploaded in two host-to-device copies (one int64, one float32).

Only what the step needs is built: rows without penalties, min_tokens, logit_bias or a draw
cost nothing, and a batch of greedy rows without options uploads nothing at all.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from tetri.workers.sample_noise import as_int64

INF = float("inf")


@dataclass
class Penalties:
    rows: torch.Tensor  # [P] batch rows with a penalty to apply
    out_index: tuple[torch.Tensor, torch.Tensor]  # (row in P, token) per output token, repeats kept
    prompt_index: tuple[torch.Tensor, torch.Tensor]  # (row in P, token) per prompt token
    repetition: torch.Tensor  # [P, 1]
    frequency: torch.Tensor  # [P, 1]
    presence: torch.Tensor  # [P, 1]


@dataclass
class Draws:
    """The rows that draw (temperature > 0), with their cut parameters."""

    rows: torch.Tensor  # [S]
    every_row: bool  # S is the whole batch (rows is 0 .. S-1)
    temperature: torch.Tensor  # [S, 1]
    top_k: torch.Tensor | None  # [S, 1] k - 1 (0 for rows without a cut); None: no row cuts
    top_k_cut: torch.Tensor | None  # [S, 1] bool: the row has a top-k cut
    top_k_max: int
    top_p: torch.Tensor | None  # [S, 1] (inf: no cut); None: no row cuts
    min_p: torch.Tensor | None  # [S, 1] (0: no cut)
    seeded: torch.Tensor | None  # [S] bool; None: every row is seeded
    keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # seed, choice, position (int64 [S] each)


@dataclass
class StepTensors:
    bias: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None  # ((rows, tokens), values)
    penalties: Penalties | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, tokens) masked to -inf (min_tokens)
    draws: Draws | None
    logprobs: dict[int, int]  # row -> how many top alternatives, for the rows that asked for logprobs
    top_logprobs: int  # the most top alternatives any row asked for


def build_step(rows, eos_token_ids: tuple[int, ...], vocab: int, device) -> StepTensors:
    ints: dict[str, list[int]] = defaultdict(list)
    floats: dict[str, list[float]] = defaultdict(list)
    pen_rows: list[int] = []
    draw_rows: list[int] = []
    flags = dict(top_k=False, top_p=False, min_p=False, unseeded=False)
    for i, row in enumerate(rows):
        p = row.params
        for tok, bias in (p.logit_bias or {}).items():
            if tok < vocab:  # an id past the vocabulary names no logit
                ints["bias_row"].append(i)
                ints["bias_tok"].append(tok)
                floats["bias"].append(bias)
        if p.has_penalties and (row.output_token_ids or p.repetition_penalty != 1.0):
            _add_penalties(ints, floats, len(pen_rows), row, vocab)
            pen_rows.append(i)
        if len(row.output_token_ids) < p.min_tokens:
            banned = [t for t in (*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)) if t < vocab]
            ints["ban_row"] += [i] * len(banned)
            ints["ban_tok"] += banned
        if not p.greedy:
            _add_draw(ints, floats, flags, row, vocab)
            draw_rows.append(i)
    ints["pen_rows"], ints["draw_rows"] = pen_rows, draw_rows
    t = _upload(device, ints, floats)
    logprobs = {i: row.params.logprobs for i, row in enumerate(rows) if row.params.logprobs is not None}
    return StepTensors(
        bias=((t["bias_row"], t["bias_tok"]), t["bias"]) if ints["bias_row"] else None,
        penalties=Penalties(t["pen_rows"], (t["out_row"], t["out_tok"]), (t["prompt_row"], t["prompt_tok"]),
                            t["rep"][:, None], t["freq"][:, None], t["pres"][:, None]) if pen_rows else None,
        banned=(t["ban_row"], t["ban_tok"]) if ints["ban_row"] else None,
        draws=_draws(t, ints, flags, len(rows)) if draw_rows else None,
        logprobs=logprobs,
        top_logprobs=max(logprobs.values(), default=0),
    )


def _add_penalties(ints, floats, j: int, row, vocab: int) -> None:
    p = row.params
    out = [t for t in row.output_token_ids if t < vocab]
    ints["out_row"] += [j] * len(out)
    ints["out_tok"] += out
    if p.repetition_penalty != 1.0:  # the prompt counts for repetition only
        prompt = [t for t in set(row.prompt_token_ids) if t < vocab]
        ints["prompt_row"] += [j] * len(prompt)
        ints["prompt_tok"] += prompt
    floats["rep"].append(p.repetition_penalty)
    floats["freq"].append(p.frequency_penalty)
    floats["pres"].append(p.presence_penalty)


def _add_draw(ints, floats, flags, row, vocab: int) -> None:
    p = row.params
    cut = 0 < p.top_k < vocab
    flags["top_k"] |= cut
    flags["top_p"] |= p.top_p < 1.0
    flags["min_p"] |= p.min_p > 0.0
    flags["unseeded"] |= p.seed is None
    floats["temperature"].append(p.temperature)
    ints["top_k"].append(p.top_k - 1 if cut else 0)
    ints["top_k_cut"].append(int(cut))
    floats["top_p"].append(p.top_p if p.top_p < 1.0 else INF)
    floats["min_p"].append(p.min_p)
    ints["seeded"].append(int(p.seed is not None))
    ints["seed"].append(as_int64(p.seed if p.seed is not None else 0))
    ints["choice"].append(row.choice)
    ints["position"].append(len(row.output_token_ids))


def _draws(t: dict[str, torch.Tensor], ints, flags, num_rows: int) -> Draws:
    return Draws(
        rows=t["draw_rows"],
        every_row=len(ints["draw_rows"]) == num_rows,
        temperature=t["temperature"][:, None],
        top_k=t["top_k"][:, None] if flags["top_k"] else None,
        top_k_cut=t["top_k_cut"][:, None].bool() if flags["top_k"] else None,
        top_k_max=max(ints["top_k"]) + 1,
        top_p=t["top_p"][:, None] if flags["top_p"] else None,
        min_p=t["min_p"][:, None] if flags["min_p"] else None,
        seeded=t["seeded"].bool() if flags["unseeded"] else None,
        keys=(t["seed"], t["choice"], t["position"]),
    )


INT_FIELDS = ("bias_row", "bias_tok", "pen_rows", "out_row", "out_tok", "prompt_row", "prompt_tok", "ban_row",
              "ban_tok", "draw_rows", "top_k", "top_k_cut", "seeded", "seed", "choice", "position")
FLOAT_FIELDS = ("bias", "rep", "freq", "pres", "temperature", "top_p", "min_p")


def _upload(device, ints: dict[str, list[int]], floats: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """Every list as a device tensor, through one int64 and one float32 copy (none when all are empty)."""
    out: dict[str, torch.Tensor] = {}
    for names, values, dtype in ((INT_FIELDS, ints, torch.long), (FLOAT_FIELDS, floats, torch.float32)):
        sizes = [len(values[n]) for n in names]
        if not sum(sizes):  # nothing of this kind to apply this step (e.g. an all-greedy batch)
            continue
        flat = to_device([v for n in names for v in values[n]], dtype, device)
        out.update(zip(names, flat.split(sizes)))
    return out


def to_device(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list as a tensor on `device`; to CUDA through pinned memory without a host sync."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
