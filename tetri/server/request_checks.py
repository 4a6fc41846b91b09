"""The request rules that span fields or need the tokenizer, written after vLLM's protocol.

Each function either returns what the engine request needs or raises a 400 naming the field.
The structured-output fields are read by `structured.py` and the tool-calling ones by
`tool_calls.py`, under the same rule.
"""

from __future__ import annotations

from tetri.server.errors import bad_request
from tetri.server.openai_schemas import CompletionRequest, SamplingRequest
from tetri.server.tokenizer import Tokenizer

MAX_LOGPROBS = 20
"""vLLM's default `--max-logprobs`: the most alternatives per token (logprobs and prompt_logprobs)."""
FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
"""Fill-in-the-middle tokens (StarCoder's, Qwen's): a tokenizer holding one set can take `suffix`."""


def check_stream_options(req: SamplingRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")


def logit_bias(req: SamplingRequest, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias`: token-id strings -> biases in [-100, 100], ids in the vocabulary."""
    if not req.logit_bias:
        return None
    out: dict[int, float] = {}
    for key, bias in req.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"token_id {token} in logit_bias is out of vocabulary (size {vocab_size})", "logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {bias} for token {token}", "logit_bias")
        out[token] = float(bias)
    return out


def prompt_logprobs(req: SamplingRequest, vocab_size: int, echo_logprobs: int | None = None) -> int | None:
    """How many alternatives per prompt token to compute (None: no prompt scoring). -1 means
    the whole vocabulary, which is past the limit of 20 as on vLLM's default server."""
    value = req.prompt_logprobs
    if value is not None:
        if req.stream:
            raise bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        wanted = vocab_size if value == -1 else value
        if wanted > MAX_LOGPROBS:
            raise bad_request(f"Requested prompt logprobs of {wanted}, which is greater than max allowed: {MAX_LOGPROBS}",
                              "prompt_logprobs")
        return wanted if echo_logprobs is None else max(wanted, echo_logprobs)
    return echo_logprobs


def truncate(ids: list[int], req: SamplingRequest, max_model_len: int) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: keep the last k prompt tokens (-1: max_model_len)."""
    k = req.truncate_prompt_tokens
    if k is None:
        return ids
    if k == -1:
        k = max_model_len
    if k == 0:
        raise bad_request("truncate_prompt_tokens must be -1 or a positive integer", "truncate_prompt_tokens")
    if k > max_model_len:
        raise bad_request(f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({max_model_len}). "
                          "Please, select a smaller truncation size.", "truncate_prompt_tokens")
    return ids[-k:] if len(ids) > k else ids


def check_best_of(req: SamplingRequest) -> None:
    """`best_of` equal to n is plain sampling; above n it would need server-side ranking."""
    n = req.n or 1
    if req.best_of is None or req.best_of == n:
        return
    if req.best_of < n:
        raise bad_request(f"best_of must be >= n (got best_of={req.best_of}, n={n})", "best_of")
    raise bad_request(f"best_of > n is not supported (got best_of={req.best_of}, n={n}); use n", "best_of")


def fim_prompt(tok: Tokenizer, req: CompletionRequest, prompt: str) -> str:
    """`suffix`: the prefix-suffix-middle prompt of a model with fill-in-the-middle tokens."""
    vocab = tok.hf.get_vocab()
    for prefix, suffix, middle in FIM_TOKENS:
        if prefix in vocab and suffix in vocab and middle in vocab:
            return f"{prefix}{prompt}{suffix}{req.suffix}{middle}"
    raise bad_request("suffix is not supported: this model has no fill-in-the-middle tokens", "suffix")
