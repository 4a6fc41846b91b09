"""Fixtures for the HTTP front end: the real default tokenizer and a live app on a real port."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import openai
import pytest

from tetri.config import ServerConfig
from tetri.server.app import create_app, start_app
from tetri.server.fake_engine import FakeEngineClient
from tetri.server.metrics import Metrics
from tetri.server.tokenizer import Tokenizer, load_tokenizer

API_KEY = "sk-test-key"


@pytest.fixture(scope="session")
def tok(default_model_dir: str) -> Tokenizer:
    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="session")
def surface_model_dir(tmp_path_factory, default_model_dir) -> str:
    """tests/server/surface_model.py's model (a template that renders tools), built once."""
    from tests.server.surface_model import build_surface_model

    return build_surface_model(default_model_dir, tmp_path_factory.mktemp("surface-session") / "model")


@pytest.fixture(scope="session")
def grammar_checker(surface_model_dir: str):
    """One grammar-check process (xgrammar over the surface model's vocabulary) for the apps of
    the whole session: the real check, started once."""
    from tetri.server.grammar_check import GrammarChecker

    tok = load_tokenizer(surface_model_dir)
    checker = GrammarChecker(surface_model_dir, tok.vocab_size, [tok.eos_token_id], max_bytes=4096, timeout_s=60.0)
    yield checker
    checker.close()


@dataclasses.dataclass
class Live:
    """One running app: its engine, metrics, base URL and an SDK client."""

    engine: FakeEngineClient
    metrics: Metrics
    port: int
    api_key: str | None
    _client: openai.AsyncOpenAI | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=30)
        return self._client


@pytest.fixture
async def serve(default_model_dir: str) -> AsyncIterator[Callable[..., object]]:
    """`await serve(**fake_kwargs, cfg=ServerConfig(...))` -> Live; torn down after the test."""
    started: list[tuple[object, Live]] = []

    async def start(cfg: ServerConfig | None = None, **fake_kwargs) -> Live:
        cfg = cfg or ServerConfig(port=0, api_key=API_KEY)
        fake_kwargs.setdefault("max_model_len", 256)
        engine = FakeEngineClient(default_model_dir, **fake_kwargs)
        metrics = Metrics()
        runner, port = await start_app(create_app(cfg, engine, metrics))
        live = Live(engine, metrics, port, cfg.api_key)
        started.append((runner, live))
        return live

    yield start
    for runner, live in started:
        if live._client is not None:
            await live._client.close()
        await runner.cleanup()


@pytest.fixture
async def live(serve) -> Live:
    return await serve()
