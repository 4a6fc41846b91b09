"""Structured outputs and tool calling at the HTTP API (the fake engine scripts the model's text;
the grammar check is the real one, xgrammar in its own process): every wrong request is a 400
naming its field, the limits hold, what reaches the engine carries the grammar, and tool calls
come back in OpenAI's shapes through the official SDK, streamed and not."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from tetri.config import ServerConfig
from tetri.server.app import create_app, start_app
from tetri.server.fake_engine import FakeEngineClient
from tetri.server.grammar_check import GrammarChecker
from tetri.server.metrics import Metrics
from tetri.server.tokenizer import load_tokenizer

MODEL = "m"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
FN = {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}
TOOLS = [{"type": "function", "function": FN},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
AUTO = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


@pytest.fixture
async def app_on(surface_model_dir, grammar_checker):
    """`await app_on(text=..., model_dir=..., **server_config)` -> (engine, base url, SDK client);
    the fake engine scripts `text`; the model is the surface model unless given."""
    running = []
    checker = grammar_checker

    async def start(text: str | None = None, model_dir: str | None = None, grammar_checker=None, **cfg):
        model_dir = model_dir or surface_model_dir
        script = load_tokenizer(model_dir).encode(text, add_special_tokens=False) if text else None
        engine = FakeEngineClient(model_dir, max_model_len=4096, script=script, eos_after=len(script) if script else None)
        app = create_app(ServerConfig(port=0, served_model_name=MODEL, **cfg), engine, Metrics(),
                         grammar_checker=grammar_checker or checker)
        runner, port = await start_app(app)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        running.append((runner, client))
        return engine, f"http://127.0.0.1:{port}", client

    yield start
    for runner, client in running:
        await client.close()
        await runner.cleanup()


async def post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.json()


CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
BAD = [  # (body fields, the param the 400 names)
    ({"tools": TOOLS}, "tool_choice"),  # "auto" by default, and the server was not started for it
    ({"functions": [FN]}, "function_call"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [], "tool_choice": "none"}, "tools"),
    ({"tools": TOOLS, "functions": [FN]}, "functions"),
    ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}], "tool_choice": "none"}, "tools[0].function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "disable_any_whitespace": True}}, "structured_outputs.disable_any_whitespace"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"guided_choice": [""]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a+"}, "min_tokens": 2}, "min_tokens"),
    ({"messages": [{**USER[0], "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{x"}}]}, *USER]},
     "messages[0].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p for _, p in BAD])
async def test_a_wrong_request_is_a_400_naming_the_field(app_on, fields, param):
    engine, url, _ = await app_on()
    status, body = await post(f"{url}/v1/chat/completions", {"messages": USER, "max_tokens": 4, **fields})
    assert status == 400 and body["error"]["param"] == param, body
    assert engine.submitted == []


async def test_completions_take_the_same_grammars(app_on):
    engine, url, client = await app_on()
    await client.completions.create(model=MODEL, prompt="a", max_tokens=3, extra_body={"guided_choice": ["yes", "no"]})
    assert engine.submitted[-1].params.structured_outputs.choice == ("yes", "no")
    status, body = await post(f"{url}/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "[a-"}})
    assert status == 400 and body["error"]["param"] == "structured_outputs.regex"


async def test_what_reaches_the_engine_is_the_request_grammar(app_on):
    engine, _, client = await app_on(**AUTO)
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    spec = engine.submitted[-1].params.structured_outputs
    assert json.loads(spec.json) == schema and list(json.loads(spec.json)["properties"]) == ["b", "a"] and spec.strict
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, response_format={"type": "json_object"})
    assert engine.submitted[-1].params.structured_outputs.json_object
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False)
    required = json.loads(engine.submitted[-1].params.structured_outputs.json)
    assert required["maxItems"] == 1 and [v["properties"]["name"]["enum"] for v in required["items"]["anyOf"]] == [
        ["get_weather"], ["get_time"]]
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, tools=TOOLS,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(engine.submitted[-1].params.structured_outputs.json) == WEATHER
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, tools=TOOLS)
    assert engine.submitted[-1].params.structured_outputs is None  # auto: the model decides, unconstrained
    strict = [{"type": "function", "function": {**FN, "strict": True}}]
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, tools=strict)
    tag = json.loads(engine.submitted[-1].params.structured_outputs.structural_tag)  # auto with strict tools
    assert tag["format"]["triggers"] == ["<tool_call>"] and tag["format"]["tags"][0]["content"]["json_schema"] == WEATHER


async def test_tools_reach_the_model_through_the_template_or_a_system_message(app_on, surface_model_dir,
                                                                           default_model_dir):
    engine, _, client = await app_on(model_dir=surface_model_dir)
    convo = [*USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    await client.chat.completions.create(model=MODEL, messages=convo, max_tokens=2, tools=TOOLS, tool_choice="none")
    text = load_tokenizer(surface_model_dir).decode(engine.submitted[-1].prompt_token_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>tools\n") and '"name": "get_weather"' in text
    assert '"arguments": {"city": "Paris"}' in text  # the call's arguments reach the template parsed
    assert "<|im_start|>tool call=c1\n18 C" in text
    engine, _, client = await app_on(model_dir=default_model_dir)  # its template knows nothing of tools
    await client.chat.completions.create(model=MODEL, messages=convo, max_tokens=2, tools=TOOLS, tool_choice="none")
    text = load_tokenizer(default_model_dir).decode(engine.submitted[-1].prompt_token_ids, skip_special_tokens=False)
    assert "<tools>" in text and '"name": "get_weather"' in text and "<tool_call>" in text and '"city": "Paris"' in text


HERMES_TEXT = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


async def _streamed(stream) -> tuple[str, dict, str | None, dict]:
    content, calls, finish, legacy = "", {}, None, {"name": "", "arguments": ""}
    async for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            if ch.delta.function_call is not None:
                legacy["name"] += ch.delta.function_call.name or ""
                legacy["arguments"] += ch.delta.function_call.arguments or ""
    return content, calls, finish, legacy


@pytest.mark.parametrize("parser,text,content", [
    ("hermes", HERMES_TEXT, "Sure."),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
])
async def test_auto_tool_calls_come_back_in_openais_shape(app_on, parser, text, content):
    _, _, client = await app_on(text=text, enable_auto_tool_choice=True, tool_call_parser=parser)
    resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=200)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    said, calls, finish, _ = await _streamed(await client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=200, stream=True))
    assert finish == "tool_calls" and said == (content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")


async def test_required_named_none_and_legacy_answers(app_on):
    _, _, client = await app_on(text='[{"name": "get_time", "parameters": {}}]', **AUTO)
    resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200)
    assert resp.choices[0].finish_reason == "tool_calls" and resp.choices[0].message.tool_calls[0].function.name == "get_time"
    args = '{"city": "Rome"}'
    _, _, client = await app_on(text=args, **AUTO)
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named, max_tokens=200)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "stop" and msg.content is None
    assert (msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments) == ("get_weather", args)
    _, calls, finish, _ = await _streamed(await client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=named, max_tokens=200, stream=True))
    assert finish == "stop" and calls[0]["name"] == "get_weather" and calls[0]["arguments"] == args
    resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=200)
    assert resp.choices[0].message.content == args and resp.choices[0].message.tool_calls is None
    _, _, client = await app_on(text=HERMES_TEXT, **AUTO)
    resp = await client.chat.completions.create(model=MODEL, messages=USER, functions=[FN], max_tokens=200)
    assert resp.choices[0].finish_reason == "function_call"
    assert resp.choices[0].message.function_call.name == "get_weather" and resp.choices[0].message.tool_calls is None
    _, _, finish, legacy = await _streamed(await client.chat.completions.create(
        model=MODEL, messages=USER, functions=[FN], max_tokens=200, stream=True))
    assert finish == "function_call" and (legacy["name"], json.loads(legacy["arguments"])) == ("get_weather", {"city": "Paris"})


async def test_grammar_size_and_compile_time_are_bounded(app_on, surface_model_dir):
    tok = load_tokenizer(surface_model_dir)
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(300)}}
    engine, url, _ = await app_on()
    status, body = await post(f"{url}/v1/chat/completions", {"messages": USER, "structured_outputs": {"json": big}})
    assert status == 400 and body["error"]["param"] == "structured_outputs.json" and "bytes" in body["error"]["message"]
    slow = GrammarChecker(surface_model_dir, tok.vocab_size, [tok.eos_token_id], max_bytes=4096, timeout_s=1e-4)
    try:
        engine, url, _ = await app_on(grammar_checker=slow)
        schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
        for _ in range(2):  # the second answer is the cached verdict: no compile runs again
            status, body = await post(f"{url}/v1/chat/completions", {"messages": USER, "guided_json": schema})
            assert status == 400 and body["error"]["param"] == "guided_json" and "longer than" in body["error"]["message"]
            assert slow.pid is None  # the compile past its bound was ended with its process
        assert engine.submitted == []
    finally:
        slow.close()


async def test_compile_times_and_cache_hits_are_in_the_metrics(app_on):
    _, url, client = await app_on()
    for _ in range(3):
        await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2,
                                             extra_body={"structured_outputs": {"regex": "[0-9]{3}x"}})
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        text = await r.text()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("tetri:grammar") and not line.startswith("#")}
    assert values['tetri:grammar_cache_requests_total{result="miss"}'] == 1
    assert values['tetri:grammar_cache_requests_total{result="hit"}'] == 2
    assert values["tetri:grammar_compile_seconds_count"] == 1 and values["tetri:grammar_compile_seconds_sum"] > 0
