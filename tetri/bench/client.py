"""Async streaming client for OpenAI-compatible servers, and the open/closed-loop request drivers.

Completions (default): `POST {base}/v1/completions` with `prompt` = a list of exactly
`prompt_tokens` token ids (deterministic pseudo-random ids in [PROMPT_ID_LOW, vocab_size)),
`max_tokens = min_tokens = output_tokens`, `ignore_eos`, `stream` and
`stream_options.include_usage`. Chat: `POST {base}/v1/chat/completions` with a text prompt of
about `prompt_tokens` words. Multi-turn chat (`run_conversations`): each conversation's turns
in order, each with the whole history so far (`workload.chat_messages`).

Timing (perf_counter, from just before the POST): TTFT = first chunk carrying text (or token
ids); ITL = gaps between successive such chunks; E2E = end of the stream. Output tokens come
from the usage chunk when the server sends one, else from the chunks. HTTP errors, bad
streams, timeouts and connection errors become failed records; nothing raises out of a run.

Keep-alive: servers close idle connections (llama.cpp's `llama-server` does), and a request
written to a pooled connection the server has just closed fails before any response byte
(`ClientOSError: Can not write request body`, `ServerDisconnectedError`). Such a request
never reached the server's handler, so it is sent again, once, on a new connection (a
session that never reuses one), and only then counts as sent: its timing starts there.
Failures after the response began, and refused connections, are never retried.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import aiohttp
import msgspec
import numpy as np

from tetri.bench.records import RequestRecord
from tetri.bench.workload import CHAT_HISTORY_MODES, ChatTurn, Request, chat_messages

PROMPT_ID_LOW = 10  # skip the ids tokenizers usually reserve for special tokens
DEFAULT_VOCAB_SIZE = 256
DEFAULT_REQUEST_TIMEOUT_S = 300.0
STALE_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
"""Raised by a write to, or the first read from, a pooled connection the server closed."""
_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
          "which but have an they you were her she there been one all we their has would when "
          "what more out up said into time some could them other than then now only its over "
          "new also after two first way use may years these any work part made good world").split()


def normalize_base_url(base_url: str) -> str:
    """'http://h:p/', 'http://h:p/v1' -> 'http://h:p'."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def prompt_token_ids(index: int, num_tokens: int, vocab_size: int = DEFAULT_VOCAB_SIZE,
                     seed: int = 0) -> list[int]:
    """Exactly `num_tokens` ids in [PROMPT_ID_LOW, vocab_size), a pure function of (seed, index)."""
    if vocab_size <= PROMPT_ID_LOW:
        raise ValueError(f"vocab_size must be > {PROMPT_ID_LOW}")
    rng = np.random.default_rng([seed, index])
    return rng.integers(PROMPT_ID_LOW, vocab_size, size=num_tokens).tolist()


def prompt_text(index: int, num_tokens: int, seed: int = 0) -> str:
    """About `num_tokens` tokens of text: common short English words (about one token each)."""
    rng = np.random.default_rng([seed, index, 1])
    return " ".join(_WORDS[i] for i in rng.integers(len(_WORDS), size=max(1, num_tokens)))


class SseParser:
    """Incremental Server-Sent-Events parser: feed bytes, get the `data` payload of each event."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        while True:
            cut = min((i for i in (self._buf.find(b"\n"), self._buf.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                return events
            # A lone '\r' at the very end may be the first half of '\r\n': wait for more bytes.
            if self._buf[cut:cut + 1] == b"\r" and cut + 1 == len(self._buf):
                return events
            line = self._buf[:cut].decode("utf-8", errors="replace")
            skip = 2 if self._buf[cut:cut + 2] == b"\r\n" else 1
            self._buf = self._buf[cut + skip:]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def close(self) -> list[str]:
        """Flush a final event that was not terminated by a blank line."""
        events = self.feed(b"\n") if self._buf else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith(":"):
            return None  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def _chunk_tokens(obj: Any, chat: bool) -> int:
    """How many tokens a decoded chunk carries (0: no text, e.g. a role or usage-only chunk)."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not choices or not isinstance(choices[0], dict):
        return 0
    choice = choices[0]
    token_ids = choice.get("token_ids")
    if isinstance(token_ids, list) and token_ids:
        return len(token_ids)
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    if chat and not text:
        text = choice.get("text")
    return 1 if text else 0


def _chunk_text(obj: Any, chat: bool) -> str:
    """The text a decoded chunk carries ("" for none)."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not choices or not isinstance(choices[0], dict):
        return ""
    text = (choices[0].get("delta") or {}).get("content") if chat else choices[0].get("text")
    return text if isinstance(text, str) else ""


def _error_text(obj: Any) -> str | None:
    if isinstance(obj, dict) and (obj.get("error") or obj.get("object") == "error"):
        err = obj.get("error") or obj
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    return None


def build_payload(req: Request, index: int, *, model: str, chat: bool, vocab_size: int,
                  seed: int) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_tokens,
        "min_tokens": req.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        payload["messages"] = [{"role": "user", "content": prompt_text(index, req.prompt_tokens, seed)}]
    else:
        payload["prompt"] = prompt_token_ids(index, req.prompt_tokens, vocab_size, seed)
    return payload


async def _post(session: aiohttp.ClientSession, fresh: aiohttp.ClientSession | None, url: str,
                payload: dict[str, Any], headers: dict[str, str] | None,
                timeout: aiohttp.ClientTimeout) -> tuple[aiohttp.ClientResponse, bool]:
    """POST and wait for the response head; (response, whether it was re-sent). A failure
    before any response byte on a pooled connection is retried once on `fresh` (a
    session without keep-alive; `session` itself when None). A refused connect is not."""
    try:
        return await session.post(url, json=payload, headers=headers, timeout=timeout), False
    except aiohttp.ClientConnectorError:
        raise
    except STALE_CONNECTION_ERRORS:
        retry_on = fresh if fresh is not None else session
        return await retry_on.post(url, json=payload, headers=headers, timeout=timeout), True


async def send_request(session: aiohttp.ClientSession, base_url: str, req: Request, index: int, *,
                       model: str, endpoint: str = "completions", vocab_size: int = DEFAULT_VOCAB_SIZE,
                       seed: int = 0, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                       headers: dict[str, str] | None = None, run_start: float | None = None,
                       fresh_session: aiohttp.ClientSession | None = None, payload: dict[str, Any] | None = None,
                       reply: dict[str, Any] | None = None) -> RequestRecord:
    """Send one streaming request; always returns a record (ok=False on any failure).
    `fresh_session`: where a request whose pooled connection turned out closed is re-sent.
    `payload`: the body to send instead of one built from `req`; `reply`: filled with the
    streamed text ("text") and, from the usage chunk, the prompt's tokens ("prompt_tokens")."""
    chat = endpoint == "chat"
    url = normalize_base_url(base_url) + ("/v1/chat/completions" if chat else "/v1/completions")
    if payload is None:
        payload = build_payload(req, index, model=model, chat=chat, vocab_size=vocab_size, seed=seed)
    texts: list[str] = []
    start = time.perf_counter()
    record = RequestRecord(prompt_tokens=req.prompt_tokens, ok=False,
                           arrival_s=start - run_start if run_start is not None else 0.0)
    chunk_tokens = 0
    usage_tokens = None
    first = last = None
    itl: list[float] = []

    def on_event(data: str) -> bool:
        """Handle one SSE payload; True once the stream is done."""
        nonlocal chunk_tokens, usage_tokens, first, last
        if data.strip() == "[DONE]":
            return True
        try:
            obj = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return False  # tolerate junk between events
        if (err := _error_text(obj)) is not None:
            raise RuntimeError(f"server error in stream: {err}")
        now = time.perf_counter()
        if reply is not None:
            texts.append(_chunk_text(obj, chat))
        n = _chunk_tokens(obj, chat)
        if n:
            if first is None:
                first = now
            else:
                itl.append(now - last)
            last = now
            chunk_tokens += n
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
            if reply is not None and usage.get("prompt_tokens") is not None:
                reply["prompt_tokens"] = int(usage["prompt_tokens"])
        return False

    try:
        timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        resp, resent = await _post(session, fresh_session, url, payload, headers, timeout)
        if resent:  # the first write never reached the server: this one is the request
            start = time.perf_counter()
            record.resent = True
        async with resp:
            if resp.status != 200:
                body = (await resp.text(errors="replace"))[:300]
                record.error = f"HTTP {resp.status}: {body}"
                return record
            if resp.content_type == "application/json":  # server ignored stream=true
                on_event(await resp.text())
            else:
                parser, done = SseParser(), False
                async for raw in resp.content.iter_any():
                    if any(on_event(event) for event in parser.feed(raw)):
                        done = True
                        break
                if not done:
                    for event in parser.close():
                        on_event(event)
        end = time.perf_counter()
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        record.error = f"timeout after {request_timeout_s:g} s"
        return record
    except Exception as exc:  # noqa: BLE001 - a failed request must never stop the run
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        return record
    if reply is not None:
        reply["text"] = "".join(texts)
    record.output_tokens = usage_tokens if usage_tokens is not None else chunk_tokens
    if first is None or record.output_tokens == 0:
        record.error = "no tokens in response"
        return record
    record.ok = True
    record.ttft_s = first - start
    record.itl_s = itl
    record.e2e_s = end - start
    return record


async def fetch_model_name(base_url: str, headers: dict[str, str] | None = None,
                           timeout_s: float = 10.0) -> str | None:
    """First model id from GET /v1/models, or None if the server does not answer it."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(normalize_base_url(base_url) + "/v1/models", headers=headers) as resp:
                if resp.status != 200:
                    return None
                data = await resp.json(content_type=None)
                return str(data["data"][0]["id"])
    except Exception:  # noqa: BLE001
        return None


async def run_requests(base_url: str, requests: Sequence[Request], *, model: str,
                       endpoint: str = "completions", concurrency: int | None = None,
                       duration_s: float | None = None, api_key: str | None = None,
                       vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
                       request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                       on_done: Callable[[RequestRecord], None] | None = None
                       ) -> tuple[list[RequestRecord], float]:
    """Drive a run; returns (records of the requests sent, run duration in seconds).

    Open loop (concurrency None): request i is sent at `arrival_s` after the start (None = 0).
    Closed loop: `concurrency` workers each send their next request when the last one ends.
    `duration_s` stops sending new requests after that many seconds (in-flight ones finish).
    The run duration is from the start to the end of the last request.
    """
    if endpoint not in ("completions", "chat"):
        raise ValueError("endpoint must be 'completions' or 'chat'")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    results: list[RequestRecord | None] = [None] * len(requests)
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap on open connections
    fresh_connector = aiohttp.TCPConnector(limit=0, force_close=True)  # re-sends: never a pooled connection
    async with aiohttp.ClientSession(connector=connector) as session, \
            aiohttp.ClientSession(connector=fresh_connector) as fresh_session:
        start = time.perf_counter()

        async def one(i: int) -> None:
            rec = await send_request(session, base_url, requests[i], i, model=model, endpoint=endpoint,
                                     vocab_size=vocab_size, seed=seed, request_timeout_s=request_timeout_s,
                                     headers=headers, run_start=start, fresh_session=fresh_session)
            results[i] = rec
            if on_done is not None:
                on_done(rec)

        if concurrency is None:
            tasks = []
            for i, req in enumerate(requests):
                at_s = req.arrival_s or 0.0
                if duration_s is not None and at_s > duration_s:
                    break
                delay = start + at_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        else:
            if concurrency < 1:
                raise ValueError("concurrency must be >= 1")
            pending = iter(range(len(requests)))

            async def worker() -> None:
                for i in pending:
                    if duration_s is not None and time.perf_counter() - start >= duration_s:
                        return
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        end = time.perf_counter()
    return [r for r in results if r is not None], end - start


async def run_conversations(base_url: str, conversations: Sequence[Sequence[ChatTurn]], *, model: str,
                            max_tokens: int, history: str = "served", concurrency: int | None = None,
                            api_key: str | None = None, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                            on_done: Callable[[RequestRecord], None] | None = None
                            ) -> tuple[list[RequestRecord], float]:
    """Multi-turn chat: each conversation's turns sent in order, each with the whole history
    (`workload.chat_messages`), greedy, streamed, at most `max_tokens` new tokens each; with
    history "served" the history carries the answers this server gave (a failed turn ends its
    conversation: the next turns would lack its answer), with "dataset" the dataset's.
    `concurrency` conversations at a time (None: all). Returns (records in conversation and
    turn order, run duration in seconds); each record's prompt_tokens is the server's count."""
    if history not in CHAT_HISTORY_MODES:
        raise ValueError(f"history must be one of {CHAT_HISTORY_MODES}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    records: list[list[RequestRecord]] = [[] for _ in conversations]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as fresh_session:
        start = time.perf_counter()

        async def converse(c: int) -> None:
            conv, answers = conversations[c], []
            for turn in range(len(conv)):
                msgs = chat_messages(conv, turn, answers if history == "served" else None)
                payload = {"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0.0,
                           "stream": True, "stream_options": {"include_usage": True}}
                reply: dict[str, Any] = {}
                rec = await send_request(session, base_url, Request(0, max_tokens), c, model=model, endpoint="chat",
                                         request_timeout_s=request_timeout_s, headers=headers, run_start=start,
                                         fresh_session=fresh_session, payload=payload, reply=reply)
                rec.prompt_tokens = reply.get("prompt_tokens", 0)
                records[c].append(rec)
                if on_done is not None:
                    on_done(rec)
                if not rec.ok and history == "served":
                    return
                answers.append(reply.get("text", ""))

        pending = iter(range(len(conversations)))

        async def worker() -> None:
            for c in pending:
                await converse(c)

        width = len(conversations) if concurrency is None else concurrency
        if width < 1:
            raise ValueError("concurrency must be >= 1")
        await asyncio.gather(*(worker() for _ in range(min(width, len(conversations)))))
        end = time.perf_counter()
    return [r for recs in records for r in recs], end - start
