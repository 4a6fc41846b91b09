"""The contract between the HTTP front end and whatever generates tokens.

`EngineClient` is implemented by the real runtime client (`tetri.server.engine_client`, which
drives the front scheduler and the workers over ZeroMQ) and by `FakeEngineClient` in tests.
Token ids in, token ids out: tokenization, chat templates, detokenization and stop strings
belong to the front end.

Each submitted request gets a `RequestStream`, a mailbox holding at most one pending
`EngineOutput`: new deltas are merged into it, so a slow reader never grows a queue.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import msgspec

from tetri.types import SamplingParams, TokenLogprob


class EngineError(RuntimeError):
    """Base for errors the front end maps to HTTP statuses."""

    status = 500


class Overloaded(EngineError):
    """The bounded admission queue is full: HTTP 429 with Retry-After."""

    status = 429


class Unavailable(EngineError):
    """No live worker of a needed role: HTTP 503."""

    status = 503


class InvalidRequest(EngineError):
    """The request can never be served here (e.g. no live KV pool holds it): HTTP 400."""

    status = 400


class EngineRequest(msgspec.Struct, kw_only=True):
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_s: float = 0.0
    expected_output_tokens: int | None = None
    """The true output length where a benchmark supplies it (for the oracle predictor)."""
    prompt_text: str | None = None
    """The prompt as text (the length predictor's text features, and the length log)."""


class ChoiceDelta(msgspec.Struct, kw_only=True):
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    """"stop" | "length" | "abort" | "error" once this choice is done."""


class EngineOutput(msgspec.Struct, kw_only=True):
    req_id: str
    choices: list[ChoiceDelta]
    error: str | None = None
    """Set when the request failed (a worker died, a deadline passed); the stream then ends."""
    queue_time_s: float | None = None
    """Seconds from submit until its first prefill chunk was dispatched (on the first output)."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """With `SamplingParams.prompt_logprobs`: prompt tokens 1.. scored (on the first output)."""

    @property
    def finished(self) -> bool:
        return self.error is not None


class RequestStream:
    """Per-request mailbox. The producer calls `put`; the consumer iterates `async for out`.

    Deltas for the same choice are merged (token ids and logprobs appended, the last
    finish_reason kept), so memory is bounded by the tokens not yet read, never by a queue of
    message objects. Iteration ends after every choice finished or an error arrived.
    """

    def __init__(self, req_id: str, n: int = 1) -> None:
        self.req_id = req_id
        self._pending: EngineOutput | None = None
        self._event = asyncio.Event()
        self._open_choices = set(range(n))
        self._closed = False

    @property
    def done(self) -> bool:
        return self._closed

    def put(self, out: EngineOutput) -> None:
        if self._closed:
            return
        for ch in out.choices:
            if ch.finish_reason is not None:
                self._open_choices.discard(ch.index)
        if out.error is not None or not self._open_choices:
            self._closed = True
        if self._pending is None:
            self._pending = out
        else:
            _merge_into(self._pending, out)
        self._event.set()

    async def get(self) -> EngineOutput | None:
        """The merged output since the last call; None once the stream is over and drained."""
        while self._pending is None:
            if self._closed:
                return None
            self._event.clear()
            await self._event.wait()
        out, self._pending = self._pending, None
        return out

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineOutput:
        out = await self.get()
        if out is None:
            raise StopAsyncIteration
        return out


def _merge_into(acc: EngineOutput, new: EngineOutput) -> None:
    by_index = {ch.index: ch for ch in acc.choices}
    for ch in new.choices:
        old = by_index.get(ch.index)
        if old is None:
            acc.choices.append(ch)
            by_index[ch.index] = ch
            continue
        old.token_ids.extend(ch.token_ids)
        if ch.logprobs is not None:
            old.logprobs = (old.logprobs or []) + ch.logprobs
        if ch.finish_reason is not None:
            old.finish_reason = ch.finish_reason
    if new.error is not None:
        acc.error = new.error
    if acc.queue_time_s is None:
        acc.queue_time_s = new.queue_time_s
    if acc.prompt_logprobs is None:
        acc.prompt_logprobs = new.prompt_logprobs


class EngineClient(Protocol):
    """What the front end needs from the engine."""

    model_dir: str
    """The model's Hugging Face directory (the front end loads the tokenizer from it)."""
    max_model_len: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def submit(self, req: EngineRequest) -> RequestStream:
        """Admit a request or raise Overloaded / Unavailable. Never blocks."""
        ...

    def abort(self, req_id: str, index: int | None = None) -> None:
        """Abort the request (or only its choice `index`, e.g. after a stop string) on every
        worker holding it; unknown ids are ignored."""
        ...

    def healthy(self) -> bool:
        """True when every needed role has a live worker."""
        ...

    def workers(self) -> list[dict]:
        """Per-worker status rows for GET /workers."""
        ...

    def num_running(self) -> int:
        """Requests admitted and not yet finished (tests use it to check nothing is left)."""
        ...
