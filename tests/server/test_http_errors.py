"""One test per error class (status + OpenAI error body), plus the auxiliary routes."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from tetri.config import ServerConfig

MODEL = "default-model-v1"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def post(live, path, body=None, *, data=None, headers=None):
    hdrs = {**live.headers, **(headers or {})}
    async with aiohttp.ClientSession() as s:
        async with s.post(live.url + path, json=body, data=data, headers=hdrs) as r:
            return r.status, await r.json(content_type=None), r.headers


def assert_error(status, body, want_status, param=None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


async def test_400_malformed_json(live):
    status, body, _ = await post(live, "/v1/chat/completions", data=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"})
    assert_error(status, body, 400)
    assert "Malformed JSON" in body["error"]["message"]


@pytest.mark.parametrize(
    "patch,param",
    [
        ({"max_tokens": "many"}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),  # any non-empty role is accepted (vLLM)
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages[0].content[0].type"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"seed": 2**70}, "seed"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
async def test_400_bad_value_names_param(live, patch, param):
    status, body, _ = await post(live, "/v1/chat/completions", {**CHAT, **patch})
    assert_error(status, body, 400, param)


async def test_400_completion_prompt_shapes(live):
    for prompt, param in (([1, "a"], "prompt"), ([[1, 2], [99999]], "prompt"), ("", "prompt"), ([], "prompt")):
        status, body, _ = await post(live, "/v1/completions", {"model": MODEL, "prompt": prompt})
        assert_error(status, body, 400, param)
    status, body, _ = await post(live, "/v1/completions", {"model": MODEL})
    assert_error(status, body, 400, "prompt")
    status, body, _ = await post(live, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert_error(status, body, 400, "messages[0].content")


async def test_400_prompt_too_long(live):
    # max_model_len is 256 in these tests
    status, body, _ = await post(live, "/v1/completions", {"model": MODEL, "prompt": [5] * 256})
    assert_error(status, body, 400, "prompt")
    status, body, _ = await post(live, "/v1/completions", {"model": MODEL, "prompt": [5] * 200, "max_tokens": 100})
    assert_error(status, body, 400, "max_tokens")
    assert "maximum context length is 256" in body["error"]["message"]
    status, body, _ = await post(live, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 300}]})
    assert_error(status, body, 400, "messages")


async def test_max_tokens_cap(serve):
    live = await serve(cfg=ServerConfig(max_tokens_cap=5))
    status, body, _ = await post(live, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 6})
    assert_error(status, body, 400, "max_tokens")
    status, body, _ = await post(live, "/v1/chat/completions", {**CHAT, "max_tokens": None})
    assert status == 200 and body["usage"]["completion_tokens"] == 5


async def test_401(live):
    async with aiohttp.ClientSession() as s:
        for hdrs in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic xyz"}):
            async with s.post(live.url + "/v1/chat/completions", json=CHAT, headers=hdrs) as r:
                assert_error(r.status, await r.json(), 401)
        async with s.get(live.url + "/metrics") as r:
            assert r.status == 401
        async with s.get(live.url + "/health") as r:
            assert r.status == 200  # /health needs no key
    async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


async def test_404_model(live):
    status, body, _ = await post(live, "/v1/chat/completions", {**CHAT, "model": "gpt-9"})
    assert_error(status, body, 404, "model")
    assert body["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await live.client().completions.create(model="gpt-9", prompt="x")


async def test_404_path_and_405(live):
    async with aiohttp.ClientSession(headers=live.headers) as s:
        async with s.get(live.url + "/v2/nothing") as r:
            assert_error(r.status, await r.json(), 404)
        async with s.get(live.url + "/v1/chat/completions") as r:
            assert_error(r.status, await r.json(), 405)
            assert "POST" in r.headers.get("Allow", "")


async def test_413(serve):
    live = await serve(cfg=ServerConfig(max_body_bytes=2048, api_key=None))
    status, body, _ = await post(live, "/v1/completions", {"model": MODEL, "prompt": "x" * 5000})
    assert_error(status, body, 413)


async def test_429_retry_after(serve):
    live = await serve(max_queue=1, token_delay_s=0.05)
    client = live.client()
    stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=50, stream=True)
    status, body, headers = await post(live, "/v1/completions", {"model": MODEL, "prompt": "y"})
    assert_error(status, body, 429)
    assert int(headers["Retry-After"]) >= 1
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
    await stream.close()


async def test_503_unhealthy(live):
    live.engine.is_healthy = False
    status, body, _ = await post(live, "/v1/chat/completions", CHAT)
    assert_error(status, body, 503)
    async with aiohttp.ClientSession() as s:
        async with s.get(live.url + "/health") as r:
            assert r.status == 503
    live.engine.is_healthy = True
    async with aiohttp.ClientSession() as s:
        async with s.get(live.url + "/health") as r:
            assert r.status == 200


async def test_engine_error_mid_request(serve):
    live = await serve(error_after=3)
    status, body, _ = await post(live, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10})
    assert_error(status, body, 500)
    assert "fake engine failure" in body["error"]["message"]
    async with aiohttp.ClientSession(headers=live.headers) as s:
        async with s.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10, "stream": True}) as r:
            raw = (await r.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]" and '"error"' in events[-2] and "fake engine failure" in events[-2]
    assert live.engine.num_running() == 0


async def test_aux_routes(live):
    async with aiohttp.ClientSession(headers=live.headers) as s:
        await live.client().completions.create(model=MODEL, prompt="x", max_tokens=3)
        async with s.get(live.url + "/metrics") as r:
            text = await r.text()
        for name in ("tetri:time_to_first_token_seconds_count 1.0", "tetri:prompt_tokens_total", "tetri:generation_tokens_total 3.0",
                     'tetri:request_success_total{finished_reason="length"} 1.0', "tetri:e2e_request_latency_seconds_count 1.0",
                     'tetri:kv_cache_usage_perc{role="mixed",worker="0"} 0.0', "tetri:num_requests_running", "tetri:inter_token_latency_seconds",
                     "tetri:kv_transfer_seconds", "tetri:kv_handoffs_total", "tetri:kv_transfer_bytes_total", "tetri:request_queue_time_seconds_count 1.0"):
            assert name in text, name
        live.metrics.observe_kv_transfer(4096, 0.002)
        async with s.get(live.url + "/metrics") as r:
            assert "tetri:kv_transfer_bytes_total 4096.0" in await r.text()
        async with s.get(live.url + "/workers") as r:
            rows = (await r.json())["workers"]
            assert rows[0]["role"] == "mixed" and "kv_blocks_total" in rows[0]
        async with s.get(live.url + "/openapi.json") as r:
            doc = await r.json()
    assert doc["openapi"].startswith("3.") and "/v1/chat/completions" in doc["paths"]
    assert "ChatCompletionRequest" in doc["components"]["schemas"]
    assert live.engine.metrics is live.metrics
