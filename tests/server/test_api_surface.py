"""The OpenAI/vLLM API surface, written from vLLM's documented behaviour (its OpenAI-compatible
server docs and response shapes), through the official openai SDK where it has the call, on
the app with the fake engine (what reaches the engine is checked on `engine.submitted`)."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.server.surface_model import FIM, build_surface_model
from tetri.cli import build_parser, served_names
from tetri.config import ServerConfig
from tetri.server.app import create_app, start_app
from tetri.server.fake_engine import FakeEngineClient
from tetri.server.metrics import Metrics
from tetri.server.tokenizer import load_tokenizer

MODEL = "default-model-v1"
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def surface_dir(tmp_path_factory, default_model_dir) -> str:
    return build_surface_model(default_model_dir, tmp_path_factory.mktemp("surface") / "model")


@pytest.fixture
async def app_on(default_model_dir):
    """`await app_on(model_dir=..., names=(...), **fake_kwargs)` -> (engine, base url, SDK client)."""
    running = []

    async def start(model_dir: str | None = None, names=None, **fake):
        fake.setdefault("max_model_len", 256)
        engine = FakeEngineClient(model_dir or default_model_dir, **fake)
        runner, port = await start_app(create_app(ServerConfig(port=0, served_model_name=names), engine, Metrics()))
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        running.append((runner, client))
        return engine, f"http://127.0.0.1:{port}", client

    yield start
    for runner, client in running:
        await client.close()
        await runner.cleanup()


async def post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.json()


async def get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


def assert_400(status: int, body: dict, param: str) -> None:
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error", body


# ---- models, names, version ---------------------------------------------------------------

async def test_models_retrieve_and_unknown_404_body(app_on):
    _, url, client = await app_on()
    card = await client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    status, body = await get(f"{url}/v1/models/nope")
    chat_status, chat_body = await post(f"{url}/v1/chat/completions", {"model": "nope", "messages": USER})
    assert status == chat_status == 404 and body == chat_body
    assert body["error"]["code"] == "model_not_found" and "nope" in body["error"]["message"]


async def test_every_alias_is_served_and_the_first_is_reported(app_on):
    _, _, client = await app_on(names=("first", "second", "/models/third"))
    assert [m.id for m in (await client.models.list()).data] == ["first", "second", "/models/third"]
    resp = await client.chat.completions.create(model="second", messages=USER, max_tokens=2)
    assert resp.model == "first"
    assert (await client.models.retrieve("/models/third")).id == "/models/third"  # a path, slashes and all
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)


def test_cli_serves_the_model_under_the_path_as_given():
    parse = build_parser().parse_args
    assert served_names(parse(["--model", "/path/to/dir"])) == ["/path/to/dir"]
    assert served_names(parse(["--model", "/d", "--served-model-name", "a", "b"])) == ["a", "b"]


async def test_version(app_on):
    from tetri import __version__

    _, url, _ = await app_on()
    assert await get(f"{url}/version") == (200, {"version": __version__})


# ---- tokenize / detokenize ----------------------------------------------------------------

async def test_tokenize_text_and_chat_and_detokenize(app_on, surface_dir):
    _, url, _ = await app_on(model_dir=surface_dir, names=("m",))
    tok = load_tokenizer(surface_dir)
    status, body = await post(f"{url}/tokenize", {"model": "m", "prompt": "Hello world"})
    assert status == 200 and body["tokens"] == tok.encode("Hello world") and body["tokens"][0] == tok.hf.bos_token_id
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256 and body["token_strs"] is None
    _, plain = await post(f"{url}/tokenize", {"prompt": "Hello world", "add_special_tokens": False, "return_token_strs": True})
    assert plain["tokens"] == body["tokens"][1:] and plain["token_strs"] == tok.hf.convert_ids_to_tokens(plain["tokens"])
    _, chat = await post(f"{url}/tokenize", {"messages": USER})
    want = tok.hf.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(want, add_special_tokens=False)
    _, no_gen = await post(f"{url}/tokenize", {"messages": USER, "add_generation_prompt": False})
    assert chat["tokens"][: no_gen["count"]] == no_gen["tokens"] and no_gen["count"] < chat["count"]
    status, detok = await post(f"{url}/detokenize", {"model": "m", "tokens": plain["tokens"]})
    assert status == 200 and detok == {"prompt": "Hello world"}
    assert_400(*await post(f"{url}/detokenize", {"tokens": [10**6]}), "tokens")
    assert_400(*await post(f"{url}/tokenize", {"prompt": "x", "bogus": 1}), "bogus")
    assert (await post(f"{url}/tokenize", {"model": "other", "prompt": "x"}))[0] == 404


# ---- logit_bias, best_of, stream_options, unknown and not-yet fields ----------------------

async def test_logit_bias_is_validated_and_reaches_the_engine(app_on):
    engine, url, client = await app_on()
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, logit_bias={"7": -100, "9": 2.5})
    assert engine.submitted[-1].params.logit_bias == {7: -100.0, 9: 2.5}
    for bias in ({"x": 1}, {"100000": 1}, {"-1": 1}, {"7": -101}, {"7": 100.5}):
        assert_400(*await post(f"{url}/v1/chat/completions", {"messages": USER, "logit_bias": bias}), "logit_bias")
        assert_400(*await post(f"{url}/v1/completions", {"prompt": "a", "logit_bias": bias}), "logit_bias")


async def test_best_of_equal_to_n_is_sampling_and_above_or_below_n_a_400(app_on):
    engine, url, client = await app_on()
    resp = await client.completions.create(model=MODEL, prompt="a", max_tokens=2, n=2, best_of=2)
    assert len(resp.choices) == 2 and engine.submitted[-1].params.n == 2
    assert_400(*await post(f"{url}/v1/completions", {"prompt": "a", "n": 1, "best_of": 3}), "best_of")
    assert_400(*await post(f"{url}/v1/completions", {"prompt": "a", "n": 3, "best_of": 2}), "best_of")


async def test_stream_options_without_stream_is_a_400(app_on):
    _, url, _ = await app_on()
    body = {"stream_options": {"include_usage": True}}
    assert_400(*await post(f"{url}/v1/chat/completions", {"messages": USER, **body}), "stream_options")
    assert_400(*await post(f"{url}/v1/completions", {"prompt": "a", "stream": False, **body}), "stream_options")


@pytest.mark.parametrize("field,value", [("store", True), ("unknown_field", 1), ("metadata", {"a": "b"})])
async def test_unknown_fields_are_a_400_naming_them(app_on, field, value):
    """(Tool calling and structured outputs have their own tests: tests/server/test_structured_api.py.)"""
    engine, url, _ = await app_on()
    assert_400(*await post(f"{url}/v1/chat/completions", {"messages": USER, field: value}), field)
    assert engine.submitted == []


async def test_documented_no_op_values_are_accepted(app_on):
    _, _, client = await app_on()
    resp = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, tool_choice="none",
                                                response_format={"type": "text"})
    assert resp.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError):  # calls belong to assistant messages
        await client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{**USER[0], "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])


async def test_user_is_logged(app_on, caplog):
    _, _, client = await app_on()
    with caplog.at_level(logging.INFO, logger="tetri.server"):
        await client.completions.create(model=MODEL, prompt="a", max_tokens=1, user="end-user-42")
    assert "end-user-42" in caplog.text


# ---- chat template controls ---------------------------------------------------------------

async def test_custom_roles_reach_the_template(app_on, surface_dir):
    engine, _, client = await app_on(model_dir=surface_dir, names=("m",))
    msgs = [{"role": "wizard", "content": "cast"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}, *USER]
    await client.chat.completions.create(model="m", messages=msgs, max_tokens=2)
    text = load_tokenizer(surface_dir).decode(engine.submitted[-1].prompt_token_ids, skip_special_tokens=False)
    assert "<|im_start|>wizard\ncast" in text and "<|im_start|>tool call=c1\n42" in text


async def test_add_generation_prompt_continue_final_message_and_echo(app_on, tok):
    engine, url, client = await app_on()
    convo = [*USER, {"role": "assistant", "content": "The answer is"}]
    resp = await client.chat.completions.create(model=MODEL, messages=convo, max_tokens=3, extra_body={
        "add_generation_prompt": False, "continue_final_message": True, "echo": True})
    ids = engine.submitted[-1].prompt_token_ids
    want = tok.hf.apply_chat_template(convo, tokenize=False, continue_final_message=True)
    assert ids == tok.encode(want, add_special_tokens=False) and want.endswith("The answer is")
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content.startswith("The answer is") and len(msg.content) > len("The answer is")
    # add_generation_prompt=False without continuing: the template ends after the last message
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, extra_body={"add_generation_prompt": False})
    plain = tok.hf.apply_chat_template(USER, tokenize=False, add_generation_prompt=False)
    assert engine.submitted[-1].prompt_token_ids == tok.encode(plain, add_special_tokens=False)
    # echo with a generation prompt: the last message is the user's, not the response role's: nothing echoed
    stream = await client.chat.completions.create(model=MODEL, messages=convo, max_tokens=2, stream=True, extra_body={
        "add_generation_prompt": False, "continue_final_message": True, "echo": True})
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed.startswith("The answer is")
    echo_user = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body={"echo": True})
    assert not echo_user.choices[0].message.content.startswith("Hello there")
    both = {"messages": convo, "continue_final_message": True}  # add_generation_prompt defaults to true
    assert_400(*await post(f"{url}/v1/chat/completions", both), "continue_final_message")


async def test_truncate_prompt_tokens_keeps_the_last_tokens(app_on):
    engine, url, client = await app_on()
    prompt = list(range(10, 40))
    await client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"truncate_prompt_tokens": 7})
    assert engine.submitted[-1].prompt_token_ids == prompt[-7:]
    await client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"truncate_prompt_tokens": -1})
    assert engine.submitted[-1].prompt_token_ids == prompt
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, extra_body={"truncate_prompt_tokens": 4})
    assert len(engine.submitted[-1].prompt_token_ids) == 4
    assert_400(*await post(f"{url}/v1/completions", {"prompt": prompt, "truncate_prompt_tokens": 257}), "truncate_prompt_tokens")
    assert_400(*await post(f"{url}/v1/completions", {"prompt": prompt, "truncate_prompt_tokens": 0}), "truncate_prompt_tokens")


async def test_suffix_builds_a_fill_in_the_middle_prompt_or_is_a_400(app_on, surface_dir):
    _, url, _ = await app_on()
    assert_400(*await post(f"{url}/v1/completions", {"prompt": "def f(", "suffix": "return x"}), "suffix")
    engine, _, client = await app_on(model_dir=surface_dir, names=("m",))
    await client.completions.create(model="m", prompt="def f(", suffix="    return x", max_tokens=2)
    text = load_tokenizer(surface_dir).decode(engine.submitted[-1].prompt_token_ids, skip_special_tokens=False)
    assert text == f"<s>{FIM[0]}def f({FIM[1]}    return x{FIM[2]}"


# ---- logprobs: logprobs=0, the end-of-turn token, prompt logprobs, echo, max_tokens=0 ------

async def test_completion_logprobs_0_holds_the_sampled_token(app_on):
    _, _, client = await app_on()
    resp = await client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=0)
    lp = resp.choices[0].logprobs
    assert [list(t) for t in lp.top_logprobs] == [[tok] for tok in lp.tokens]
    assert [t[tok] for t, tok in zip(lp.top_logprobs, lp.tokens)] == lp.token_logprobs
    two = (await client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=2)).choices[0].logprobs
    assert all(tok in top and 2 <= len(top) <= 3 for tok, top in zip(two.tokens, two.top_logprobs))


async def test_chat_logprobs_leave_out_the_end_of_turn_token(app_on):
    _, _, client = await app_on(eos_after=3)
    resp = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, logprobs=True)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content
    assert len(choice.logprobs.content) == 3


def _check_prompt_logprobs(rows, prompt_ids: list[int], k: int, tok) -> None:
    assert rows[0] is None and len(rows) == len(prompt_ids)
    for row, token in zip(rows[1:], prompt_ids[1:]):
        assert str(token) in row and 1 <= len(row) <= k + 1
        for key, entry in row.items():
            assert set(entry) == {"logprob", "rank", "decoded_token"} and entry["logprob"] <= 0
            assert entry["decoded_token"] == tok.token_info(int(key))[0]


async def test_prompt_logprobs_shape_chat_and_completions(app_on, tok):
    engine, url, client = await app_on()
    chat = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body={"prompt_logprobs": 2})
    assert engine.submitted[-1].params.prompt_logprobs == 2
    _check_prompt_logprobs(chat.model_extra["prompt_logprobs"], engine.submitted[-1].prompt_token_ids, 2, tok)
    comp = await client.completions.create(model=MODEL, prompt=["one two", "three"], max_tokens=2,
                                           extra_body={"prompt_logprobs": 0})
    for choice, req in zip(comp.choices, engine.submitted[-2:]):
        _check_prompt_logprobs(choice.model_extra["prompt_logprobs"], req.prompt_token_ids, 0, tok)
    for bad in (-1, 21):
        assert_400(*await post(f"{url}/v1/completions", {"prompt": "a", "prompt_logprobs": bad}), "prompt_logprobs")
    stream = {"prompt": "a", "prompt_logprobs": 1, "stream": True}
    assert_400(*await post(f"{url}/v1/completions", stream), "prompt_logprobs")


async def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt(app_on, tok):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 0 returns the prompt's own
    tokens and logprobs (the first unscored) and generates nothing."""
    engine, url, client = await app_on()
    resp = await client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1)
    choice, ids = resp.choices[0], engine.submitted[-1].prompt_token_ids
    lp = choice.logprobs
    assert choice.text == "The quick brown fox" and resp.usage.completion_tokens == 0
    assert lp.tokens == [tok.token_info(t)[0] for t in ids] and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:]) and lp.text_offset[0] == 0
    assert all(tok_ in top for tok_, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    gen = await client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=3, echo=True, logprobs=0)
    g = gen.choices[0]
    assert g.text.startswith("The quick brown fox") and len(g.logprobs.tokens) == len(ids) + 3
    assert g.logprobs.text_offset[len(ids)] == len("The quick brown fox")
    plain = await client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2, echo=True)
    assert plain.choices[0].text.startswith(tok.decode([5, 6, 7], skip_special_tokens=False))
    assert_400(*await post(f"{url}/v1/completions", {"prompt": "a", "max_tokens": 0}), "max_tokens")
