"""Drive a `Generation` to the client, as SSE or as one JSON body.

The endpoint modules supply a `Formatter` (the OpenAI shape of chunks and responses); this
module owns the transport: SSE framing, usage chunks, `[DONE]`, error events, and the rule
that every exit path — finished, failed, client gone, handler cancelled — ends in
`Generation.close()`, which aborts whatever the engine still runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import msgspec
from aiohttp import web

from tetri.server.errors import ApiError
from tetri.server.generation import ChoiceUpdate, Generation, GenerationFailed, LogprobEntry

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OFF_LOOP_CHARS = 32_768
"""Prompts longer than this are tokenized in a thread so the event loop keeps streaming."""

T = TypeVar("T")


@dataclass
class ResponseOptions:
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    return_token_ids: bool = False


@dataclass
class ChoiceAccum:
    """A finished choice of a non-streaming response."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Formatter(Protocol):
    def head_chunks(self) -> list[dict]: ...

    def chunk(self, up: ChoiceUpdate, usage: dict | None) -> dict | None: ...

    def usage_chunk(self, usage: dict) -> dict: ...

    def response(self, choices: list[ChoiceAccum], usage: dict) -> dict: ...


def usage_of(gen: Generation) -> dict:
    prompt, completion = gen.prompt_tokens, gen.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse_event(payload: dict) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


async def off_loop(fn: Callable[[], T], size: int) -> T:
    """Run CPU-heavy tokenization in a thread when the input is large."""
    if size <= OFF_LOOP_CHARS:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(None, fn)


async def serve(request: web.Request, gen: Generation, fmt: Formatter, opts: ResponseOptions) -> web.StreamResponse:
    """Submit `gen` (429/503 before any byte is sent) and answer it."""
    gen.submit()
    try:
        if opts.stream:
            return await _serve_stream(request, gen, fmt, opts)
        return await _serve_full(gen, fmt)
    finally:
        gen.close()


async def _serve_full(gen: Generation, fmt: Formatter) -> web.Response:
    n = gen.params.n
    accums = [ChoiceAccum(i) for i in range(n * len(gen.prompts))]
    try:
        async for ups in gen.updates():
            for up in ups:
                acc = accums[up.index]
                acc.texts.append(up.text)
                acc.token_ids.extend(up.token_ids)
                if up.logprobs is not None:
                    acc.logprobs = (acc.logprobs or []) + up.logprobs
                acc.finish_reason = up.finish_reason
    except GenerationFailed as exc:
        raise ApiError(exc.status, str(exc)) from None
    return web.Response(body=_encode(fmt.response(accums, usage_of(gen))), content_type="application/json")


async def _serve_stream(request: web.Request, gen: Generation, fmt: Formatter, opts: ResponseOptions) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    try:
        await resp.write(b"".join(sse_event(c) for c in fmt.head_chunks()))
        await _pump(resp, gen, fmt, opts)
        if opts.include_usage:
            await resp.write(sse_event(fmt.usage_chunk(usage_of(gen))) + _DONE)
        else:
            await resp.write(_DONE)
    except GenerationFailed as exc:
        await _write_error(resp, ApiError(exc.status, str(exc)))
    except (ConnectionError, OSError):
        pass  # client went away: close() in serve() aborts the engine request
    except Exception:  # noqa: BLE001 - headers are sent: report in-band, never a bare 500
        log.exception("streaming %s failed", gen.req_id)
        await _write_error(resp, ApiError(500, "Internal server error."))
    return resp


async def _pump(resp: web.StreamResponse, gen: Generation, fmt: Formatter, opts: ResponseOptions) -> None:
    async for ups in gen.updates():
        usage = usage_of(gen) if opts.continuous_usage else None
        events = [sse_event(chunk) for up in ups if (chunk := fmt.chunk(up, usage)) is not None]
        if events:
            await resp.write(b"".join(events))


async def _write_error(resp: web.StreamResponse, err: ApiError) -> None:
    try:
        await resp.write(sse_event(err.body()) + _DONE)
    except (ConnectionError, OSError):
        pass


def clamp_logprob(value: float) -> float:
    """JSON has no -inf: OpenAI-compatible servers clamp at -9999."""
    return value if value > -9999.0 else -9999.0


def prompt_logprobs_json(tok, entries: list | None, top: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a dict keyed by
    token id (as a string): the prompt token itself and the `top` most likely, each with its
    logprob, 1-based rank and decoded text."""
    out: list[dict | None] = [None]
    for e in entries or ():
        row = {str(e.token_id): _plp(tok, e.token_id, e.logprob, e.rank)}
        for rank, (token_id, logprob) in enumerate(e.top[:top], start=1):
            row.setdefault(str(token_id), _plp(tok, token_id, logprob, rank))
        out.append(row)
    return out


def _plp(tok, token_id: int, logprob: float, rank: int | None) -> dict:
    return {"logprob": clamp_logprob(logprob), "rank": rank, "decoded_token": tok.token_info(token_id)[0]}
