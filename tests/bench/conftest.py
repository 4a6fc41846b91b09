"""A tiny fake OpenAI-compatible server (aiohttp) for the tetri-bench tests.

It runs in its own thread and event loop on 127.0.0.1 with an ephemeral port, so both async
tests and the synchronous CLI (`main()` calls asyncio.run) can use it. Behaviour is chosen by
the request's model name:
  "fake"       stream max_tokens tokens, then a usage chunk and [DONE]
  "nousage"    the same without the usage chunk
  "flaky-K"    every K-th request (by arrival at the server) answers HTTP 500
  "slow"       sleep 2 s before answering (for client timeouts)
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

SHARED_DIR = Path(__file__).resolve().parents[2].parent / "shared"
TRACES_DIR = SHARED_DIR / "traces"



@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """The shared traces folder; skips the test when it is absent."""
    if not (TRACES_DIR / "azure_llm_2023").is_dir():
        pytest.skip(f"shared traces not found at {TRACES_DIR} (CI puts shared/ beside the checkout)")
    return TRACES_DIR


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The shared datasets folder; skips the test when it is absent."""
    if not (SHARED_DIR / "datasets" / "alpaca_eval").is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DIR / 'datasets'}")
    return SHARED_DIR / "datasets"

TOKEN_SLEEP_S = 0.001


@dataclass
class FakeState:
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    seen: list[tuple[int, int]] = field(default_factory=list)  # (prompt length, max_tokens) served
    bodies: list[dict] = field(default_factory=list)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def make_app(state: FakeState) -> web.Application:
    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def handle(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        state.calls += 1
        call = state.calls
        model = body.get("model", "")
        if model.startswith("flaky-") and call % int(model.split("-")[1]) == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        if model == "slow":
            await asyncio.sleep(2.0)
        if chat:
            prompt_len = len(body["messages"][-1]["content"].split())
        else:
            prompt = body["prompt"]
            prompt_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        max_tokens = int(body.get("max_tokens", 16))
        state.seen.append((prompt_len, max_tokens))
        state.bodies.append(body)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            kind = "chat.completion.chunk" if chat else "text_completion"
            base = {"id": f"cmpl-{call}", "object": kind, "created": 0, "model": model}
            if chat:  # role-only first chunk, no content: must not count as a token
                await resp.write(_sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                 "content": ""}}]}))
            await asyncio.sleep(2 * TOKEN_SLEEP_S)  # "prefill"
            for i in range(max_tokens):
                finish = "length" if i == max_tokens - 1 else None
                choice = ({"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": finish} if chat
                          else {"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": finish})
                await resp.write(_sse({**base, "choices": [choice]}))
                await asyncio.sleep(TOKEN_SLEEP_S)
            if model != "nousage":
                usage = {"prompt_tokens": prompt_len, "completion_tokens": max_tokens,
                         "total_tokens": prompt_len + max_tokens}
                await resp.write(_sse({**base, "choices": [], "usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            state.in_flight -= 1

    async def completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await handle(request, chat=True)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


class FakeServer:
    def __init__(self) -> None:
        self.state = FakeState()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _start(self) -> None:
        self.runner = web.AppRunner(make_app(self.state), shutdown_timeout=0.5, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def start(self) -> FakeServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def fake_server():
    server = FakeServer().start()
    try:
        yield server
    finally:
        server.stop()
