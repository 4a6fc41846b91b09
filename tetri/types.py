"""Core in-process types shared by every layer: sampling parameters and request outputs.

This is a leaf module: it imports nothing from the subpackages. `SamplingParams` is a
msgspec Struct so it can ride inside `tetri.protocol` messages unchanged.
"""

from __future__ import annotations

import enum
import hashlib

import msgspec


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # client went away or an operator aborted it
    ERROR = "error"  # a worker failed while holding the request


GRAMMAR_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


class StructuredOutputsParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The grammar an output must follow (vLLM's `StructuredOutputsParams`): exactly one of
    `json` (a JSON schema, as JSON text), `json_object` (any JSON object), `regex`, `choice`
    (one of these strings), `grammar` (EBNF, xgrammar's dialect) or `structural_tag` (xgrammar's
    structural tag JSON: free text with tagged, schema-constrained regions). Every worker
    compiles it with xgrammar (`tetri/workers/grammar.py`, cached by `key`); the front checks
    that it compiles before admitting the request (`tetri/server/grammar_check.py`)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    strict: bool = True
    """JSON schema: no properties or items beyond those the schema names (OpenAI's `strict`,
    xgrammar's strict mode); False keeps JSON Schema's defaults (extra properties allowed)."""
    any_whitespace: bool = True
    """JSON: any whitespace between tokens (vLLM's `disable_any_whitespace` turns it off)."""
    prefix_token_ids: tuple[int, ...] = ()
    """Tokens the grammar has already accepted: a migrated request's output so far, which its
    continuation carries in the prompt. Not part of `key`."""

    @property
    def kind(self) -> str:
        kinds = [k for k in GRAMMAR_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(GRAMMAR_KINDS)} (got {kinds or 'none'})")
        return kinds[0]

    @property
    def key(self) -> str:
        """What the compiled grammar depends on: the same key compiles to the same grammar."""
        spec = msgspec.structs.replace(self, prefix_token_ids=())
        return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:32]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What to sample and when to stop. Defaults follow vLLM's offline `SamplingParams`."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token (0: only the sampled one)
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before anything else (OpenAI's semantics, -100..100)."""
    prompt_logprobs: int | None = None
    """Score the prompt: each prompt token's logprob (and rank) after the tokens before it, with
    this many top alternatives (0: only the prompt token); None: not computed."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a grammar: the workers mask every step's logits with it."""

    def validate(self) -> None:
        """Raise ValueError naming the offending field when a value is out of range."""
        checks = (
            ("n", self.n >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be non-negative"),
            ("logit_bias", all(t >= 0 and -100.0 <= b <= 100.0 for t, b in (self.logit_bias or {}).items()),
             "must map non-negative token ids to biases in [-100, 100]"),
        )
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why} (got {getattr(self, name)!r})")
        if self.structured_outputs is not None:
            self.structured_outputs.kind  # noqa: B018 - raises ValueError unless exactly one grammar is set
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides "
                                 "where the output may end")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # vLLM's epsilon: tinier temperatures underflow softmax

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    """Log-probability of the sampled token and of the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []
    rank: int | None = None
    """1-based rank of `token_id` in the distribution (set for prompt logprobs)."""


class CompletionOutput(msgspec.Struct, kw_only=True):
    """One choice of a finished request (the offline API's result)."""

    index: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class RequestOutput(msgspec.Struct, kw_only=True):
    """The offline API's result for one prompt: `outs[0].token_ids`, `.text`, `.finish_reason`
    refer to the first choice; `.outputs` holds all n."""

    req_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `SamplingParams.prompt_logprobs`: one entry per prompt token, None for the first."""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
