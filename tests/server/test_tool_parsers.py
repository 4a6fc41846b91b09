"""The tool-call parsers (tetri/server/tool_parsers.py), fed whole and fed piece by piece: the same
calls and content either way, and text that is no call is content, as vLLM's parsers read it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetri.server.tool_parsers import Parsed, make_parser

HERMES = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>')
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"timezone": "UTC"}}'
REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
WANT = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"timezone": "Europe/Paris"})]


def _feed(parser, pieces: list[str]) -> Parsed:
    out = Parsed()
    for piece in pieces:
        out.extend(parser.feed(piece))
    return out.extend(parser.finish())


def _calls(parsed: Parsed) -> list[tuple[str, dict]]:
    """Streamed deltas joined by index, as a client does."""
    calls: dict[int, list] = {}
    for d in parsed.calls:
        entry = calls.setdefault(d.index, ["", ""])
        entry[0] += d.name or ""
        entry[1] += d.arguments
    return [(name, json.loads(args)) for name, args in calls.values()]


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_hermes_reads_the_same_calls_whatever_the_pieces(cuts):
    parser = make_parser("hermes")
    parsed = _feed(parser, _split(HERMES, cuts))
    assert _calls(parsed) == WANT
    assert parsed.content == "Let me check." == parser.content
    assert [c.name for c in parser.calls] == ["get_weather", "get_time"] and all(c.id.startswith("call_") for c in parser.calls)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_llama3_json_and_required_read_the_same_calls_whatever_the_pieces(cuts):
    llama = _feed(make_parser("llama3_json"), _split(LLAMA, cuts))
    assert _calls(llama) == [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "UTC"})] and llama.content == ""
    required = _feed(make_parser("required"), _split(REQUIRED, cuts))
    assert _calls(required) == [("get_weather", {"city": "Paris"}), ("get_time", {})] and required.content == ""


@pytest.mark.parametrize("kind,text", [
    ("hermes", "Just words, no call."),
    ("hermes", "Broken <tool_call>{not json}</tool_call> tail"),
    ("llama3_json", "The answer is {not a call}."),
    ("llama3_json", '{"no_name": 1}'),
    ("required", "[{\"name\": \"f\", \"parameters\": {}"),  # cut short by max_tokens
])
def test_text_that_is_no_call_is_content(kind, text):
    parser = make_parser(kind)
    parsed = _feed(parser, [text[:5], text[5:]])
    assert parser.calls == [] and parsed.calls == [] and parsed.content == text


def test_an_unterminated_hermes_call_at_the_end_is_still_read():
    parsed = _feed(make_parser("hermes"), ['<tool_call>{"name": "f", "arguments": {"x": 1}}'])
    assert _calls(parsed) == [("f", {"x": 1})]


def test_parallel_tool_calls_false_keeps_the_first_call():
    parser = make_parser("hermes", max_calls=1)
    assert _calls(_feed(parser, [HERMES])) == WANT[:1] and len(parser.calls) == 1


def test_a_named_call_streams_its_arguments_as_they_come():
    parser = make_parser("named", name="get_time")
    first, second = parser.feed('{"timezone": '), parser.feed('"UTC"}')
    assert (first.calls[0].id, first.calls[0].name, first.calls[0].arguments) == (parser.calls[0].id, "get_time", '{"timezone": ')
    assert (second.calls[0].id, second.calls[0].arguments) == (None, '"UTC"}')
    assert parser.finish().calls == [] and json.loads(parser.calls[0].arguments) == {"timezone": "UTC"}
