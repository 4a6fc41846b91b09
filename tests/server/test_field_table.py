"""No request field is accepted and ignored: every field of every request schema is listed
here with its handling, the table must cover exactly the schemas' fields (a field added to a
schema without an entry fails), and each entry is checked against the live app:

    Engine(patch)    the patched request reaches the engine changed (`engine.submitted`)
    Response(patch)  the patched request's response differs (ids and timestamps aside)
    Refused(patch)   a 400 whose `param` names the field, and nothing reaches the engine
    Model            a served name is accepted, any other a 404
    Logged(patch)    recorded in the server log (OpenAI's `user`; a json_schema's name and description)

Each patch is applied to a base request (`base` extras first, so the patch alone makes the
difference): an entry whose field did nothing would fail its check.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field

import aiohttp
import msgspec
import pytest

from tetri.config import ServerConfig
from tetri.server import openai_schemas as schemas
from tetri.server.app import create_app, start_app
from tetri.server.fake_engine import FakeEngineClient
from tetri.server.metrics import Metrics

NAME = "m"
USER = [{"role": "user", "content": "Hello there"}]
CONVO = [*USER, {"role": "assistant", "content": "The answer is"}]


@dataclass
class Case:
    kind: str
    patch: dict
    base: dict = field(default_factory=dict)
    param: str | None = None


def Engine(patch, **base):  # noqa: N802 - table constructors
    return Case("engine", patch, base)


def Response(patch, **base):  # noqa: N802
    return Case("response", patch, base)


def Refused(patch, param=None, **base):  # noqa: N802
    return Case("refused", patch, base, param)


def Logged(patch, text, **base):  # noqa: N802
    return Case("logged", patch, base, text)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
OTHER_SCHEMA = {"type": "object", "properties": {"b": {"type": "string"}}}
FN_A = {"name": "a", "description": "does a", "parameters": SCHEMA}
FN_B = {"name": "b", "parameters": OTHER_SCHEMA}
TOOLS = [{"type": "function", "function": FN_A}, {"type": "function", "function": FN_B}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": '{"a": 1}'}}
CALLED = [{"role": "assistant", "content": "calling", "tool_calls": [CALL]}, *[{"role": "user", "content": "Hello there"}]]
TAG = json.dumps({"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f>"], "tags": [
    {"type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": SCHEMA}, "end": "</f>"}]}})


MODEL = Case("model", {})
SHARED = {
    "model": MODEL,
    "max_tokens": Engine({"max_tokens": 3}),
    "temperature": Engine({"temperature": 0.5}),
    "top_p": Engine({"top_p": 0.5}),
    "top_k": Engine({"top_k": 3}),
    "min_p": Engine({"min_p": 0.2}),
    "seed": Engine({"seed": 9}),
    "stop": Response({"stop": "STOP_FROM_BASE"}),
    "stop_token_ids": Engine({"stop_token_ids": [7]}),
    "n": Engine({"n": 2}),
    "best_of": Refused({"best_of": 3}),
    "presence_penalty": Engine({"presence_penalty": 0.5}),
    "frequency_penalty": Engine({"frequency_penalty": 0.5}),
    "repetition_penalty": Engine({"repetition_penalty": 1.5}),
    "logit_bias": Engine({"logit_bias": {"7": 5}}),
    "stream": Response({"stream": True}),
    "stream_options": Response({"stream_options": {"include_usage": True}}, stream=True),
    "user": Case("logged", {"user": "end-user-7"}),
    "ignore_eos": Engine({"ignore_eos": True}),
    "min_tokens": Engine({"min_tokens": 2}),
    "return_token_ids": Response({"return_token_ids": True}),
    "priority": Engine({"priority": 5}),
    "prompt_logprobs": Engine({"prompt_logprobs": 1}),
    "truncate_prompt_tokens": Engine({"truncate_prompt_tokens": 2}),
    "response_format": Engine({"response_format": {"type": "json_object"}}),
    "structured_outputs": Engine({"structured_outputs": {"regex": "a+"}}),
    "guided_json": Engine({"guided_json": SCHEMA}),
    "guided_regex": Engine({"guided_regex": "a+"}),
    "guided_choice": Engine({"guided_choice": ["a", "b"]}),
    "guided_grammar": Engine({"guided_grammar": 'root ::= "a" | "b"'}),
    "guided_decoding_backend": Refused({"guided_decoding_backend": "outlines"}),
    "guided_whitespace_pattern": Refused({"guided_whitespace_pattern": " "}),
}
CHAT = {
    **SHARED,
    "messages": Engine({"messages": [{"role": "user", "content": "Other words"}]}),
    "max_completion_tokens": Engine({"max_completion_tokens": 3}),
    "logprobs": Engine({"logprobs": True}),
    "top_logprobs": Engine({"top_logprobs": 2}, logprobs=True),
    "add_generation_prompt": Engine({"add_generation_prompt": False}),
    "continue_final_message": Engine({"continue_final_message": True}, add_generation_prompt=False, messages=CONVO),
    "echo": Response({"echo": True}, add_generation_prompt=False, continue_final_message=True, messages=CONVO),
    "tools": Engine({"tools": TOOLS}),
    "tool_choice": Engine({"tool_choice": "required"}, tools=TOOLS),
    "parallel_tool_calls": Engine({"parallel_tool_calls": False}, tools=TOOLS, tool_choice="required"),
    "functions": Engine({"functions": [FN_A]}, function_call="none"),
    "function_call": Engine({"function_call": {"name": "a"}}, functions=[FN_A]),
}
COMPLETION = {
    **SHARED,
    "prompt": Engine({"prompt": "Other words"}),
    "logprobs": Engine({"logprobs": 1}),
    "echo": Response({"echo": True}),
    "suffix": Engine({"suffix": "tail"}),
}
MESSAGE = {  # fields of one chat message (patched into messages[0])
    "role": Engine({"role": "wizard"}),
    "content": Engine({"content": "Other words"}),
    "name": Engine({"name": "bob"}),
    "tool_call_id": Engine({"tool_call_id": "call-1"}),
    "tool_calls": Engine({"tool_calls": [CALL]}, role="assistant"),
    "function_call": Engine({"function_call": CALL["function"]}, role="assistant"),
}
TOOL_CALL = {"id": Engine({"id": "call_2"}), "function": Engine({"function": {"name": "b", "arguments": "{}"}})}
FUNCTION_CALL = {"name": Engine({"name": "b"}), "arguments": Engine({"arguments": '{"a": 2}'})}
TOOL = {"function": Engine({"function": FN_B})}
FUNCTION_DEF = {
    "name": Engine({"name": "c"}),
    "description": Engine({"description": "does a differently"}),
    "parameters": Engine({"parameters": OTHER_SCHEMA}),
    "strict": Engine({"strict": True}),
}
NAMED_TOOL_CHOICE = {"function": Engine({"function": {"name": "b"}})}
NAMED_FUNCTION = {"name": Engine({"name": "b"})}
JSON_SCHEMA_FORMAT = {"json_schema": Engine({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})}
JSON_SCHEMA_SPEC = {
    "name": Logged({"name": "other_label"}, "other_label"),
    "description": Logged({"description": "what it is for"}, "what it is for"),
    "schema": Engine({"schema": OTHER_SCHEMA}),
    "strict": Engine({"strict": True}),
}
STRUCTURED_OUTPUTS = {
    "json": Engine({"json": SCHEMA}),
    "regex": Engine({"regex": "[ab]+"}),
    "choice": Engine({"choice": ["a", "b"]}),
    "grammar": Engine({"grammar": 'root ::= "a" | "b"'}),
    "json_object": Engine({"json_object": True}),
    "structural_tag": Engine({"structural_tag": TAG}),
    "disable_any_whitespace": Engine({"disable_any_whitespace": True}, json=SCHEMA),
}
TEXT_PART = {"text": Engine({"text": "Other words"})}  # messages[0].content = [{"type": "text", ...}]
STREAM_OPTIONS = {
    "include_usage": Response({"include_usage": True}),
    "continuous_usage_stats": Response({"continuous_usage_stats": True}, include_usage=True),
}
TOKENIZE_TEXT = {
    "model": MODEL,
    "prompt": Response({"prompt": "Other words"}),
    "add_special_tokens": Response({"add_special_tokens": False}),
    "return_token_strs": Response({"return_token_strs": True}),
}
TOKENIZE_CHAT = {
    "model": MODEL,
    "messages": Response({"messages": [{"role": "user", "content": "Other words"}]}),
    "add_generation_prompt": Response({"add_generation_prompt": False}),
    "continue_final_message": Response({"continue_final_message": True}, add_generation_prompt=False, messages=CONVO),
    "add_special_tokens": Response({"add_special_tokens": True}),
    "return_token_strs": Response({"return_token_strs": True}),
}
DETOKENIZE = {"model": MODEL, "tokens": Response({"tokens": [20, 21]})}

TABLES = [  # (schema, table, endpoint, base request, where a patch goes)
    (schemas.ChatCompletionRequest, CHAT, "/v1/chat/completions", {"messages": USER, "max_tokens": 4}, "top"),
    (schemas.CompletionRequest, COMPLETION, "/v1/completions", {"prompt": "Hello there", "max_tokens": 4}, "top"),
    (schemas.Message, MESSAGE, "/v1/chat/completions", {"messages": USER, "max_tokens": 4}, "message"),
    (schemas.TextPart, TEXT_PART, "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "max_tokens": 4}, "part"),
    (schemas.StreamOptions, STREAM_OPTIONS, "/v1/completions",
     {"prompt": "Hello", "max_tokens": 4, "stream": True, "stream_options": {}}, "stream_options"),
    (schemas.TokenizeCompletionRequest, TOKENIZE_TEXT, "/tokenize", {"prompt": "Hello there"}, "top"),
    (schemas.TokenizeChatRequest, TOKENIZE_CHAT, "/tokenize", {"messages": USER}, "top"),
    (schemas.DetokenizeRequest, DETOKENIZE, "/detokenize", {"tokens": [10, 11]}, "top"),
    (schemas.ToolCallMsg, TOOL_CALL, "/v1/chat/completions", {"messages": CALLED, "max_tokens": 4},
     "messages.0.tool_calls.0"),
    (schemas.FunctionCallMsg, FUNCTION_CALL, "/v1/chat/completions", {"messages": CALLED, "max_tokens": 4},
     "messages.0.tool_calls.0.function"),
    (schemas.Tool, TOOL, "/v1/chat/completions", {"messages": USER, "max_tokens": 4, "tools": TOOLS[:1],
                                                   "tool_choice": "required"}, "tools.0"),
    (schemas.FunctionDef, FUNCTION_DEF, "/v1/chat/completions", {"messages": USER, "max_tokens": 4, "tools": TOOLS[:1],
                                                                 "tool_choice": "required"}, "tools.0.function"),
    (schemas.NamedToolChoice, NAMED_TOOL_CHOICE, "/v1/chat/completions",
     {"messages": USER, "max_tokens": 4, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "a"}}},
     "tool_choice"),
    (schemas.NamedFunction, NAMED_FUNCTION, "/v1/chat/completions",
     {"messages": USER, "max_tokens": 4, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "a"}}},
     "tool_choice.function"),
    (schemas.TextFormat, {}, "/v1/completions", {"prompt": "Hello", "max_tokens": 4}, "top"),
    (schemas.JsonObjectFormat, {}, "/v1/completions", {"prompt": "Hello", "max_tokens": 4}, "top"),
    (schemas.JsonSchemaFormat, JSON_SCHEMA_FORMAT, "/v1/completions", {"prompt": "Hello", "max_tokens": 4},
     "response_format"),
    (schemas.JsonSchemaSpec, JSON_SCHEMA_SPEC, "/v1/chat/completions",
     {"messages": USER, "max_tokens": 4, "response_format": {"type": "json_schema", "json_schema": {
         "name": "x", "schema": SCHEMA}}}, "response_format.json_schema"),
    (schemas.StructuredOutputsRequest, STRUCTURED_OUTPUTS, "/v1/completions", {"prompt": "Hello", "max_tokens": 4},
     "structured_outputs"),
]


def _fields(cls) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(cls)} - {"type"}  # TextPart's tag


@pytest.mark.parametrize("cls,table", [(t[0], t[1]) for t in TABLES], ids=[t[0].__name__ for t in TABLES])
def test_table_covers_exactly_the_schema_fields(cls, table):
    assert set(table) == _fields(cls)


def test_every_request_schema_has_a_table():
    """Every msgspec Struct the server decodes requests into is one of the tables' schemas."""
    structs = {obj for obj in vars(schemas).values()
               if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__module__ == schemas.__name__}
    abstract = {schemas._Strict, schemas.SamplingRequest}  # bases: their fields are in the tables of their subclasses
    assert structs - abstract == {t[0] for t in TABLES}


def _apply(base: dict, where: str, patch: dict) -> dict:
    """`patch` merged into the object at `where` (a dotted path; objects missing on it are created)."""
    body = copy.deepcopy(base)
    target = body
    path = {"top": "", "message": "messages.0", "part": "messages.0.content.0"}.get(where, where)
    for key in filter(None, path.split(".")):
        target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
    target.update(patch)
    return body


@pytest.fixture
async def app(surface_model_dir, grammar_checker):
    """The fake engine over the surface model; the grammar check is the real one (every grammar in
    the tables compiles)."""
    engine = FakeEngineClient(surface_model_dir, max_model_len=2048, default_seed=3)
    cfg = ServerConfig(port=0, served_model_name=NAME, enable_auto_tool_choice=True, tool_call_parser="hermes")
    runner, port = await start_app(create_app(cfg, engine, Metrics(), grammar_checker=grammar_checker))
    yield engine, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _call(url: str, body: dict) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        raw = await r.read()
    if raw.startswith(b"data: "):
        events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
        return r.status, [_strip(e) for e in events]
    return r.status, _strip(json.loads(raw))


def _strip(payload):
    if isinstance(payload, dict):
        return {k: v for k, v in payload.items() if k not in ("id", "created")}
    return payload


CASES = [(cls.__name__, name, case, endpoint, base, where)
         for cls, table, endpoint, base, where in TABLES for name, case in table.items()]


@pytest.mark.parametrize("schema,name,case,endpoint,base,where", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
async def test_field_has_its_effect(app, caplog, schema, name, case, endpoint, base, where):
    engine, url = app
    base = _apply(base, where, case.base) if case.base else base
    if case.kind == "model":
        assert (await _call(url + endpoint, {**base, "model": NAME}))[0] == 200
        assert (await _call(url + endpoint, {**base, "model": "other"}))[0] == 404
        return
    status, before = await _call(url + endpoint, base)
    assert status == 200, before
    sent_before = len(engine.submitted)
    patch = case.patch
    if name == "stop":  # a stop string taken from the base output, so it must cut it
        text = before["choices"][0].get("text") or before["choices"][0]["message"]["content"]
        patch = {"stop": text[1:3]}
    with caplog.at_level(logging.INFO, logger="tetri.server"):
        status, after = await _call(url + endpoint, _apply(base, where, patch))
    if case.kind == "refused":
        assert status == 400 and after["error"]["param"] == (case.param or name), after
        assert len(engine.submitted) == sent_before
        return
    assert status == 200, after
    if case.kind == "engine":
        first, second = engine.submitted[sent_before - 1], engine.submitted[-1]
        assert (first.prompt_token_ids, first.params, first.priority) != (second.prompt_token_ids, second.params, second.priority)
    elif case.kind == "response":
        assert after != before
    elif case.kind == "logged":
        assert (case.param or patch["user"]) in caplog.text and after == before
