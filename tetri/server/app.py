"""The aiohttp application: OpenAI-compatible routes in front of an `EngineClient`.

Lifecycle:
1. `create_app(cfg, engine, metrics)` builds the app: typed keys, middlewares (OpenAI error
   bodies outermost, then the bearer-key check), one route table.
2. On start-up the cleanup context starts the engine and loads the tokenizer of the model
   directory the engine names; on clean-up it closes the engine.
3. On shutdown the app first stops admitting (`/health` and new requests answer 503), lets
   running requests finish for `shutdown_timeout`, then aiohttp cancels the rest, whose
   handlers abort their engine requests on the way out.
`run_server(cfg, engine)` runs all of this on uvloop until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from tetri.config import ServerConfig
from tetri.server.engine_api import EngineClient
from tetri.server.errors import ApiError, auth_middleware, error_middleware
from tetri.server.grammar_check import GrammarChecker
from tetri import __version__
from tetri.server.keys import CONFIG, ENGINE, METRICS, STATE, ServerState, served_model_names
from tetri.server.metrics import CONTENT_TYPE, Metrics
from tetri.server.openai_schemas import model_not_found
from tetri.server.openapi import openapi_document
from tetri.server.serving_chat import chat_completions
from tetri.server.serving_completions import completions
from tetri.server.serving_tokenize import detokenize, tokenize
from tetri.server.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0
"""How long running requests may drain on shutdown (candidate for ServerConfig)."""
_CREATED = int(time.time())


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


@web.middleware
async def draining_middleware(request: web.Request, handler) -> web.StreamResponse:
    if request.app[STATE].draining and request.method == "POST":
        raise ApiError(503, "The server is shutting down.")
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if request.app[STATE].draining or not engine.healthy():
        why = getattr(engine, "unhealthy_reason", lambda: None)()  # the real client says why
        raise ApiError(503, f"The engine is not healthy: {why}." if why else "The engine is not healthy.")
    return web.Response(status=200)


def _card(name: str, engine: EngineClient) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": _CREATED,
        "owned_by": "tetri",
        "root": engine.model_dir,
        "parent": None,
        "max_model_len": engine.max_model_len,
    }


async def models(request: web.Request) -> web.Response:
    """One card per served name (vLLM lists every alias; the first is the reported one)."""
    engine, state = request.app[ENGINE], request.app[STATE]
    return _json({"object": "list", "data": [_card(name, engine) for name in state.served_names]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the card, or the same 404 as an unknown `model` in a request."""
    name = request.match_info["model_id"]
    if name not in request.app[STATE].served_names:
        raise model_not_found(name)
    return _json(_card(name, request.app[ENGINE]))


async def version(request: web.Request) -> web.Response:
    return _json({"version": __version__})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render(request.app[ENGINE].workers())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def workers(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = {"workers": engine.workers(), "num_running": engine.num_running()}
    if hasattr(engine, "roles"):  # the role policy's last decision and its reason (--mode auto, --flip)
        body["roles"] = engine.roles()
    return _json(body)


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_document())


ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.get("/v1/models", models),
    web.get("/v1/models/{model_id:.+}", model),
    web.post("/tokenize", tokenize),
    web.post("/detokenize", detokenize),
    web.get("/version", version),
    web.get("/health", health),
    web.get("/metrics", metrics),
    web.get("/workers", workers),
    web.get("/openapi.json", openapi),
]


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine, state = app[ENGINE], app[STATE]
    own_checker = state.grammar is None
    await engine.start()
    try:
        state.served_names = served_model_names(app[CONFIG], engine)
        state.tokenizer = tok = await asyncio.get_running_loop().run_in_executor(None, load_tokenizer, engine.model_dir)
        if own_checker:
            cfg = app[CONFIG]
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            state.grammar = GrammarChecker(engine.model_dir, tok.vocab_size, eos, max_bytes=cfg.max_grammar_bytes,
                                           timeout_s=cfg.grammar_compile_timeout_s)
        yield
    finally:
        if own_checker and state.grammar is not None:
            state.grammar.close()
        await engine.close()


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].draining = True


def create_app(cfg: ServerConfig, engine: EngineClient, metrics: Metrics | None = None,
               grammar_checker: GrammarChecker | None = None) -> web.Application:
    """The front-end app for `engine`; `metrics` defaults to a fresh private registry; the grammar
    checker to one of the app's own (tests share one across apps: its process starts once)."""
    metrics = metrics if metrics is not None else Metrics()
    if hasattr(engine, "metrics"):
        engine.metrics = metrics  # type: ignore[attr-defined] - the engine client reports KV transfers
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(cfg.api_key), draining_middleware],
        client_max_size=cfg.max_body_bytes,
    )
    app[CONFIG] = cfg
    app[ENGINE] = engine
    app[METRICS] = metrics
    app[STATE] = ServerState(served_names=(), grammar=grammar_checker)
    app.router.add_routes(ROUTES)
    app.cleanup_ctx.append(_engine_ctx)
    app.on_shutdown.append(_on_shutdown)
    return app


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_server(
    cfg: ServerConfig,
    engine: EngineClient,
    metrics: Metrics | None = None,
    *,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
) -> None:
    """Serve until SIGINT/SIGTERM on uvloop, then shut down gracefully:
    stop admitting (503) -> let running requests finish for `shutdown_timeout` -> end the rest
    with an error event (the engine aborts them on every worker) -> tear everything down."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(create_app(cfg, engine, metrics), cfg, shutdown_timeout))
    finally:
        loop.close()


async def _serve(app: web.Application, cfg: ServerConfig, shutdown_timeout: float) -> None:
    import signal

    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
        log.info("======== Running on http://%s:%d ========", cfg.host, cfg.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await _drain(app, shutdown_timeout)
    finally:
        await runner.cleanup()


async def _drain(app: web.Application, timeout_s: float) -> None:
    app[STATE].draining = True
    engine = app[ENGINE]
    deadline = time.monotonic() + timeout_s
    while engine.num_running() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if engine.num_running() and hasattr(engine, "fail_all"):
        log.warning("ending %d unfinished requests at shutdown", engine.num_running())
        engine.fail_all("the server shut down before this request finished")
        await asyncio.sleep(0.5)  # let the handlers write their error events and [DONE]


async def start_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Run `app` inside the current loop (tests, benchmarks, embedding); returns the bound port."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]
