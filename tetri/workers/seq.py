"""Per-sequence state inside a worker, and the stop rules.

A request with n choices becomes n `Seq`s that share one prefill: choice 0 runs the prompt,
then the others fork its KV blocks. A sequence's block owner key is `Seq.key`.

A migrated request arrives with its earlier outputs appended to its prompt (they need KV
like the prompt) and `prior_outputs` saying how many of the prompt's last tokens those are:
for sampling (penalties, the seeded draw's position) and the stop rules they count as
outputs, so the stream goes on exactly as it would have on the worker that died.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from tetri.types import FinishReason, SamplingParams, TokenLogprob


_uids = itertools.count()


def new_uid() -> int:
    return next(_uids)


def seq_key(req_id: str, choice: int) -> str:
    return f"{req_id}/{choice}"


@dataclass
class Seq:
    req_id: str
    choice: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose KV is in this worker's pool."""
    finish_reason: FinishReason | None = None
    arrival_s: float = 0.0
    recompute: bool = False
    """Preempted: re-prefilling prompt + outputs before decoding resumes."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """Mixed core, `params.prompt_logprobs` set: prompt tokens 1.. scored during its prefill."""
    uid: int = field(default_factory=new_uid)
    """Unique in the process for this sequence's current KV: renewed whenever its blocks are
    freed (the attention backend's decode staging keys on it)."""
    grammar: object | None = None
    """With `params.structured_outputs`: this worker's xgrammar matcher for it, built on the
    first step that samples it (`tetri/workers/grammar.py`)."""
    priority: int = 0
    """vLLM's semantics: lower values are served (and kept from preemption) first."""
    prior_outputs: int = 0
    """How many of `prompt_ids`' last tokens are outputs emitted before a migration."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache hashes of its leading full blocks (prompt, then outputs), as far as known."""

    @property
    def key(self) -> str:
        return seq_key(self.req_id, self.choice)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    @property
    def num_outputs(self) -> int:
        """Outputs of the request so far, those before a migration included."""
        return self.prior_outputs + len(self.output_ids)

    @property
    def sample_prompt_ids(self) -> list[int]:
        """The request's own prompt (without earlier outputs), as the sampler sees it."""
        return self.prompt_ids[: len(self.prompt_ids) - self.prior_outputs] if self.prior_outputs else self.prompt_ids

    @property
    def sample_output_ids(self) -> list[int]:
        """Every output of the request so far, as the sampler sees it."""
        if not self.prior_outputs:
            return self.output_ids
        return self.prompt_ids[len(self.prompt_ids) - self.prior_outputs:] + self.output_ids

    def tokens(self, start: int, stop: int) -> list[int]:
        return (self.prompt_ids + self.output_ids)[start:stop] if stop > len(self.prompt_ids) else self.prompt_ids[start:stop]


def check_stop(seq: Seq, token: int, eos_ids: tuple[int, ...], max_model_len: int) -> FinishReason | None:
    """Finish reason after `token` was appended to `seq.output_ids`, or None to go on."""
    p = seq.params
    n_out = seq.num_outputs
    if n_out >= p.min_tokens:
        if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids:
            return FinishReason.STOP
    if n_out >= p.max_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
