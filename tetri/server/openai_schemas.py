"""OpenAI request schemas (msgspec) and their conversion to engine `SamplingParams`.

Decoding is strict: a mistyped field and an unknown field are each a 400 naming the field
(no field is ever accepted and ignored). Range checks live in the schema where they are
simple, so `/openapi.json` shows them; the checks that span fields or need the prompt, the
tokenizer or the server config live in `request_checks.py` and `sampling_params`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from tetri.server.errors import ApiError, bad_request
from tetri.types import SamplingParams, StructuredOutputsParams

I64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Meta(ge=1, le=2**63 - 1)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 1024


class _Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every request object refuses fields it does not know (a 400 naming the field)."""


class TextPart(_Strict, tag_field="type", tag="text"):
    text: str


Content = str | list[TextPart]


class FunctionCallMsg(_Strict, kw_only=True):
    """A call the assistant made: `arguments` is JSON text (the chat template gets it parsed)."""

    name: Annotated[str, Meta(min_length=1)]
    arguments: str


class ToolCallMsg(_Strict, tag_field="type", tag="function", kw_only=True):
    id: Annotated[str, Meta(min_length=1)]
    function: FunctionCallMsg


class Message(_Strict, kw_only=True):
    """A chat message. Any role is accepted, as vLLM does (custom roles go to the chat template
    as given): `tool` messages answer a call by `tool_call_id`, assistant messages may carry the
    `tool_calls` they made (or the legacy `function_call`)."""

    role: Annotated[str, Meta(min_length=1)]
    content: Content | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallMsg] | None = None
    function_call: FunctionCallMsg | None = None


FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
"""OpenAI's rule for function names: letters, digits, underscores and dashes, at most 64."""


class FunctionDef(_Strict, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments object (absent: any object)."""
    strict: bool | None = None


class Tool(_Strict, tag_field="type", tag="function", kw_only=True):
    function: FunctionDef


class NamedFunction(_Strict, kw_only=True):
    name: FunctionName


class NamedToolChoice(_Strict, tag_field="type", tag="function", kw_only=True):
    function: NamedFunction


class JsonSchemaSpec(_Strict, kw_only=True):
    """`response_format.json_schema` (OpenAI's shape; `schema` is the JSON schema itself)."""

    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Strict, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(_Strict, tag_field="type", tag="json_object"):
    pass


class JsonSchemaFormat(_Strict, tag_field="type", tag="json_schema", kw_only=True):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class StructuredOutputsRequest(_Strict, kw_only=True):
    """vLLM's `structured_outputs` extra: exactly one of the constraints (see `structured.py`)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: Annotated[list[str], Meta(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool | None = None


class StreamOptions(_Strict, kw_only=True):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    """vLLM extension: usage on every chunk (only together with include_usage)."""


class SamplingRequest(_Strict, kw_only=True):
    """Fields shared by chat and text completions (see `request_checks.py` for the rules that
    span fields, and tests/server/test_field_table.py for where each field takes effect)."""

    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: I64 | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = 1
    best_of: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = False
    min_tokens: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = 0
    return_token_ids: bool | None = False
    """vLLM extension: `prompt_token_ids` on the response, `token_ids` on each choice."""
    priority: I64 | None = 0
    prompt_logprobs: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | None = None
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Meta(min_length=1)] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    echo: bool | None = False
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None


class CompletionRequest(SamplingRequest, kw_only=True):
    prompt: str | Annotated[list[str | TokenId | list[TokenId]], Meta(min_length=1)]
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool | None = False
    suffix: str | None = None


class TokenizeCompletionRequest(_Strict, kw_only=True):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Strict, kw_only=True):
    model: str | None = None
    messages: Annotated[list[Message], Meta(min_length=1)]
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    return_token_strs: bool | None = False


class DetokenizeRequest(_Strict, kw_only=True):
    model: str | None = None
    tokens: list[TokenId]


T = TypeVar("T", bound=msgspec.Struct)
_AT = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"Object (?:missing required|contains unknown) field `([^`]*)`")


@functools.lru_cache(maxsize=None)
def _decoder(cls: type[T]) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(cls)


def decode_request(body: bytes, cls: type[T]) -> T:
    """Decode a JSON body into `cls`; malformed JSON or a mistyped field -> 400 naming it."""
    try:
        return _decoder(cls).decode(body)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        raise bad_request(f"Invalid request: {msg}", param=_param_of(msg)) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"Malformed JSON body: {exc}") from None


def _param_of(msg: str) -> str | None:
    """The offending field of a msgspec message, e.g. "messages[0].role"."""
    m = _AT.search(msg)
    path = m.group(1) if m else ""
    missing = _MISSING.match(msg)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


def model_not_found(requested: str) -> ApiError:
    return ApiError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")


def check_model(requested: str | None, served: Sequence[str] | str) -> None:
    names = (served,) if isinstance(served, str) else served
    if requested is not None and requested not in names:
        raise model_not_found(requested)


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as the plain dicts a chat template expects (text parts joined by newlines; an
    assistant's calls as `tool_calls` with their arguments parsed, as Hugging Face templates and
    vLLM render them)."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.content
        if content is None and msg.role != "assistant":
            raise bad_request("Object missing required field `content`", f"messages[{i}].content")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        item: dict[str, Any] = {"role": msg.role, "content": content}
        if msg.name is not None:
            item["name"] = msg.name
        if msg.tool_call_id is not None:
            item["tool_call_id"] = msg.tool_call_id
        calls = [(f"messages[{i}].tool_calls[{j}].function", c.id, c.function) for j, c in enumerate(msg.tool_calls or ())]
        if msg.function_call is not None:
            calls.append((f"messages[{i}].function_call", None, msg.function_call))
        if calls:
            if msg.role != "assistant":
                field = "tool_calls" if msg.tool_calls else "function_call"
                raise bad_request("only assistant messages carry tool calls", f"messages[{i}].{field}")
            item["tool_calls"] = [_template_call(param, call_id, fn) for param, call_id, fn in calls]
        out.append(item)
    return out


def _template_call(param: str, call_id: str | None, fn: FunctionCallMsg) -> dict[str, Any]:
    try:
        arguments = json.loads(fn.arguments)
    except ValueError:
        raise bad_request(f"arguments must be JSON text (got {fn.arguments[:80]!r})", f"{param}.arguments") from None
    call: dict[str, Any] = {"type": "function", "function": {"name": fn.name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    return call


def completion_prompts(req: CompletionRequest) -> list[str] | list[list[int]]:
    """The prompt field as a list of strings or a list of token-id lists (never mixed)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if all(isinstance(p, list) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise bad_request("prompt must be a string, a list of strings, a token id list or a list of token id lists", "prompt")


def stop_strings(req: SamplingRequest) -> list[str]:
    stop = req.stop
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise bad_request("stop strings must be non-empty", "stop")
    return stops


def check_prompt_ids(ids: list[int], vocab_size: int, max_model_len: int, param: str = "prompt") -> None:
    if not ids:
        raise bad_request("The prompt is empty.", param)
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary (size {vocab_size}).", param)
    if len(ids) >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has {len(ids)} tokens, leaving no room for output.",
            param,
        )


def resolve_max_tokens(
    requested: int | None,
    default: int | None,
    longest_prompt: int,
    max_model_len: int,
    cap: int | None,
    param: str = "max_tokens",
) -> int:
    """vLLM's rule: prompt + max_tokens must fit max_model_len; omitted -> what is left
    (or `default`, e.g. 16 for legacy completions), bounded by the server's cap."""
    room = max_model_len - longest_prompt
    if requested is None:
        value = room if default is None else min(default, room)
        return max(1, min(value, cap) if cap is not None else value)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{longest_prompt + requested} tokens ({longest_prompt} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or {param}.",
            param,
        )
    if cap is not None and requested > cap:
        raise bad_request(f"{param} must be <= {cap} on this server (got {requested}).", param)
    return requested


def sampling_params(req: SamplingRequest, *, max_tokens: int, logprobs: int | None, max_n: int,
                    logit_bias: dict[int, float] | None = None, prompt_logprobs: int | None = None,
                    n: int | None = None, structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """Build and validate the engine's SamplingParams; a ValueError names the field -> 400."""
    n = n if n is not None else (req.n if req.n is not None else 1)
    if n > max_n:
        raise bad_request(f"n must be <= {max_n} on this server (got {n}).", "n")
    opt = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
    }
    params = SamplingParams(
        n=n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens or 0,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        logit_bias=logit_bias,
        prompt_logprobs=prompt_logprobs,
        structured_outputs=structured_outputs,
        **{k: v for k, v in opt.items() if v is not None},
    )
    try:
        params.validate()
    except ValueError as exc:
        msg = str(exc)
        raise bad_request(msg, msg.split(" ", 1)[0]) from None
    return params
