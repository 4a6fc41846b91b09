"""Malformed input never breaks the server; vanished clients never leave engine work behind."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "default-model-v1"
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
    "top_logprobs", "stream", "stream_options", "user", "ignore_eos", "min_tokens", "return_token_ids", "priority", "echo",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
plausible = {
    "max_tokens": st.integers(-2, 40), "n": st.integers(-1, 3), "temperature": st.floats(-1, 3), "stream": st.booleans(),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5)), "logprobs": st.one_of(st.booleans(), st.integers(-1, 25)),
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 600), max_size=5), st.lists(st.text(max_size=5), max_size=3)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bad"]),
                                                "content": st.one_of(st.text(max_size=10), json_values)}), max_size=3),
    "stream_options": st.one_of(json_values, st.fixed_dictionaries({"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()})),
}


@st.composite
def bodies(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 3}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        strategy = plausible.get(name, json_values)
        base[name] = draw(st.one_of(strategy, json_values))
    if draw(st.booleans()):
        base.pop(draw(st.sampled_from(sorted(base))), None)
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    return base


def generate(n: int) -> list:
    out = []

    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies())
    def collect(body):
        out.append(body)

    collect()
    return out


async def test_malformed_bodies_get_4xx_and_server_survives(live):
    cases = generate(300)
    async with aiohttp.ClientSession(headers={**live.headers, "Content-Type": "application/json"}) as s:
        for i, body in enumerate(cases):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            async with s.post(live.url + path, data=data) as r:
                raw = await r.read()
                assert r.status in (200, 400, 404), (path, body, r.status, raw[:300])
                if r.status != 200:
                    err = json.loads(raw)["error"]
                    assert err["message"] and err["type"], raw
        async with s.get(live.url + "/health") as r:
            assert r.status == 200
        async with s.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2}) as r:
            assert r.status == 200
    await _wait_idle(live)


async def _wait_idle(live, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while live.engine.num_running() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert live.engine.num_running() == 0


async def _stream_then_hang_up(s, live, rng, path, body):
    async with s.post(live.url + path, json={**body, "stream": True}) as r:
        assert r.status == 200
        for _ in range(rng.randrange(0, 30)):
            if not await r.content.readline():
                break
        r.close()  # drop the connection mid-stream


async def _request_then_give_up(s, live, path, body):
    try:
        await asyncio.wait_for(s.post(live.url + path, json=body), timeout=0.03)
    except asyncio.TimeoutError:
        pass


async def test_disconnects_abort_engine_requests(serve):
    live = await serve(token_delay_s=0.002, max_model_len=4096)
    rng = random.Random(7)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "n": 2}
    cmpl = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2000, "stop": ["zz"]}
    async with aiohttp.ClientSession(headers=live.headers) as s:
        jobs = []
        for i in range(24):
            path, body = ("/v1/chat/completions", chat) if i % 2 else ("/v1/completions", cmpl)
            if i % 3 == 0:
                jobs.append(_request_then_give_up(s, live, path, body))
            else:
                jobs.append(_stream_then_hang_up(s, live, rng, path, body))
        await asyncio.gather(*jobs)
    await _wait_idle(live)
    submitted = {r.req_id for r in live.engine.submitted}
    aborted = {req_id for req_id, index in live.engine.aborted if index is None}
    assert len(submitted) == 24 + 12  # completions send two prompts -> two engine requests
    assert submitted <= aborted
