"""One API request's life on the engine, shared by chat and text completions.

1. `submit()` sends one `EngineRequest` per prompt (each with `n` choices); if the engine
   refuses one, those already admitted are aborted and the EngineError propagates (429/503).
2. `updates()` reads the engine streams and yields, per merged output, one `ChoiceUpdate`
   per choice that moved: new text (detokenized, stop strings applied), new token ids,
   logprobs and the finish reason. A stop string finishes its choice with "stop" and aborts
   that choice on the engine. An engine error or an "abort"/"error" finish raises
   `GenerationFailed`.
3. `close()` runs in the caller's `finally`: any engine request whose stream is not over is
   aborted (client gone, error, shutdown), and the request's metrics are recorded.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tetri.server.detok import IncrementalDetokenizer, StopMatcher
from tetri.server.engine_api import ChoiceDelta, EngineClient, EngineError, EngineOutput, EngineRequest, RequestStream
from tetri.server.metrics import Metrics
from tetri.server.tokenizer import Tokenizer
from tetri.types import SamplingParams, TokenLogprob


class GenerationFailed(Exception):
    """The engine failed or aborted the request: 500 ("error") or 503 ("abort")."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class LogprobEntry:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    text_offset: int


@dataclass(slots=True)
class ChoiceUpdate:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry] | None
    finish_reason: str | None


class ChoiceState:
    """Detokenizer + stop matcher + counters for one output choice."""

    __slots__ = ("index", "detok", "matcher", "min_tokens", "num_tokens", "text_offset", "finish_reason", "stop_hit",
                 "drop_stop_logprob", "discard")

    def __init__(self, index: int, tokenizer: Tokenizer, prompt_ids: list[int], stops: list[str], min_tokens: int,
                 drop_stop_logprob: bool = False, discard: bool = False, keep_special: bool = False) -> None:
        self.index = index
        self.drop_stop_logprob = drop_stop_logprob
        """Chat: the end-of-turn token's logprob is left out, so the joined tokens equal the content."""
        self.discard = discard
        """max_tokens=0 (prompt scoring): the one token the engine must sample is not output."""
        decode = functools.partial(tokenizer.decode, skip_special_tokens=False) if keep_special else tokenizer.decode
        self.detok = IncrementalDetokenizer(decode, prompt_ids)
        """`keep_special`: special tokens stay in the text (a tool-call parser reads markers such as
        <tool_call> that some tokenizers mark special, as vLLM keeps them for its parsers)."""
        self.matcher = StopMatcher(stops)
        self.min_tokens = min_tokens
        self.num_tokens = 0
        self.text_offset = 0
        self.finish_reason: str | None = None
        self.stop_hit = False

    def feed(self, delta: ChoiceDelta) -> ChoiceUpdate | None:
        if self.finish_reason is not None:
            return None  # e.g. tokens the engine made before our stop-string abort landed
        if self.discard:
            self.finish_reason = "length" if delta.finish_reason in ("stop", "length") else delta.finish_reason
            return ChoiceUpdate(self.index, "", [], None, self.finish_reason)
        texts: list[str] = []
        ids: list[int] = []
        lps: list[LogprobEntry] | None = [] if delta.logprobs is not None else None
        skip_last = delta.finish_reason == "stop"  # EOS / stop token id: not part of the text
        last = len(delta.token_ids) - 1
        for i, tok in enumerate(delta.token_ids):
            ids.append(tok)
            self.num_tokens += 1
            dropped = skip_last and i == last and self.drop_stop_logprob
            if lps is not None and delta.logprobs is not None and i < len(delta.logprobs) and not dropped:
                lp = delta.logprobs[i]
                lps.append(LogprobEntry(tok, lp.logprob, list(lp.top), self.text_offset))
            piece = "" if (skip_last and i == last) else self.detok.step(tok)
            self.text_offset += len(piece)
            if self._emit(piece, texts):
                self.finish_reason = "stop"
                self.stop_hit = delta.finish_reason is None  # the engine is still generating it
                break
        if self.finish_reason is None and delta.finish_reason is not None:
            self._finish(delta.finish_reason, texts)
        return ChoiceUpdate(self.index, "".join(texts), ids, lps, self.finish_reason)

    def _emit(self, piece: str, texts: list[str]) -> bool:
        if not piece:
            return False
        if self.num_tokens > self.min_tokens:
            out, hit = self.matcher.feed(piece)
        else:
            out, hit = piece, False
        if out:
            texts.append(out)
        return hit

    def _finish(self, reason: str, texts: list[str]) -> None:
        if reason in ("stop", "length"):
            tail = self.detok.flush()
            self.text_offset += len(tail)
            if self._emit(tail, texts):
                reason = "stop"
            else:
                rest = self.matcher.flush()
                if rest:
                    texts.append(rest)
        self.finish_reason = reason


@dataclass
class _Timing:
    arrival_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished: bool = False
    reasons: list[str] = field(default_factory=list)


class Generation:
    """The engine side of one API request (see the module docstring for the lifecycle)."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Tokenizer,
        metrics: Metrics,
        *,
        req_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        stops: list[str],
        priority: int = 0,
        arrival_s: float | None = None,
        drop_stop_logprob: bool = False,
        discard_output: bool = False,
        keep_special: bool = False,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.req_id = req_id
        self.prompts = prompts
        self.params = params
        self.priority = priority
        n = params.n
        self.choices = [
            [ChoiceState(p * n + i, tokenizer, ids, stops, params.min_tokens, drop_stop_logprob, discard_output,
                         keep_special) for i in range(n)]
            for p, ids in enumerate(prompts)
        ]
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None] * len(prompts)
        """Per prompt, with params.prompt_logprobs: tokens 1.. scored (the first output carries them)."""
        self.streams: list[RequestStream] = []
        self._timing = _Timing(arrival_s=time.monotonic() if arrival_s is None else arrival_s)
        self._aborted: set[int] = set()  # prompts already aborted as a whole
        self._open = n * len(prompts)  # choices not finished yet
        self._pending: dict[asyncio.Task, int] = {}  # multi-prompt: one stream.get() per prompt
        self._ready: list[tuple[int, asyncio.Task]] = []

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for row in self.choices for c in row)

    @property
    def finished(self) -> bool:
        return self._open == 0

    def engine_req_id(self, prompt_idx: int) -> str:
        return self.req_id if len(self.prompts) == 1 else f"{self.req_id}-{prompt_idx}"

    def submit(self) -> None:
        """Admit every prompt or none (EngineError propagates after undoing the admitted ones)."""
        try:
            for p, ids in enumerate(self.prompts):
                req = EngineRequest(
                    req_id=self.engine_req_id(p),
                    prompt_token_ids=ids,
                    params=self.params,
                    priority=self.priority,
                    arrival_s=self._timing.arrival_s,
                )
                self.streams.append(self.engine.submit(req))
        except EngineError:
            self._abort_open()
            self.streams.clear()
            raise

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        while self._open:
            p, out = await self._next_output()
            if out.prompt_logprobs is not None and self.prompt_logprobs[p] is None:
                self.prompt_logprobs[p] = out.prompt_logprobs  # a migrated re-prefill scores again: keep the first
            if out.queue_time_s is not None:
                self.metrics.observe_queue_time(out.queue_time_s)
            ups = [up for delta in out.choices if (up := self._feed(p, delta)) is not None]
            if ups:
                self._observe_tokens(ups)
            if out.error is not None:
                raise GenerationFailed(f"The engine failed while generating: {out.error}", 500)
            for up in ups:
                if up.finish_reason in ("abort", "error"):
                    status = 503 if up.finish_reason == "abort" else 500
                    raise GenerationFailed(f"The request was {'aborted' if status == 503 else 'failed'} by the engine.", status)
            yield ups

    def _feed(self, prompt_idx: int, delta: ChoiceDelta) -> ChoiceUpdate | None:
        row = self.choices[prompt_idx]
        if not 0 <= delta.index < len(row):
            return None
        state = row[delta.index]
        was_open = state.finish_reason is None
        up = state.feed(delta)
        if was_open and state.finish_reason is not None:
            self._open -= 1
        if state.stop_hit:  # a stop string ended this choice; the engine is still generating it
            state.stop_hit = False
            if self._prompt_done(prompt_idx):
                self._aborted.add(prompt_idx)
                self.engine.abort(self.engine_req_id(prompt_idx))
            else:
                self.engine.abort(self.engine_req_id(prompt_idx), delta.index)
        return up

    async def _next_output(self) -> tuple[int, EngineOutput]:
        """The next (prompt index, merged output) from any stream with open choices."""
        if len(self.streams) == 1:  # the common case: no helper tasks, no extra wake-ups
            return 0, _require(await self.streams[0].get())
        if not self._ready:
            for p, stream in enumerate(self.streams):
                if p not in self._pending.values() and not self._prompt_done(p):
                    self._pending[asyncio.ensure_future(stream.get())] = p
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            self._ready.extend((self._pending.pop(task), task) for task in done)
        p, task = self._ready.pop()
        return p, _require(task.result())

    def _prompt_done(self, prompt_idx: int) -> bool:
        return all(c.finish_reason is not None for c in self.choices[prompt_idx])

    def _observe_tokens(self, ups: list[ChoiceUpdate]) -> None:
        new = len(ups[0].token_ids) if len(ups) == 1 else max(len(up.token_ids) for up in ups)
        if new:
            now = time.monotonic()
            t = self._timing
            if t.first_token_s is None:
                t.first_token_s = now
                self.metrics.observe_first_token(now - t.arrival_s)
                new -= 1
            elif t.last_token_s is not None and new:
                self.metrics.observe_inter_token(now - t.last_token_s, new)
            t.last_token_s = now
        for up in ups:
            if up.finish_reason is not None:
                self._timing.reasons.append(up.finish_reason)

    def _abort_open(self) -> None:
        for p, stream in enumerate(self.streams):
            if not stream.done and p not in self._aborted:
                self._aborted.add(p)
                self.engine.abort(self.engine_req_id(p))

    def close(self) -> None:
        """Abort whatever is still running on the engine and record the request's metrics."""
        for task in self._pending:
            task.cancel()
        self._pending.clear()
        self._abort_open()
        t = self._timing
        if t.finished or not self.streams:
            return
        t.finished = True
        unfinished = sum(1 for row in self.choices for c in row if c.finish_reason is None)
        reasons = [r for r in t.reasons if r in ("stop", "length", "abort")] + ["abort"] * unfinished
        self.metrics.observe_request(
            e2e_s=time.monotonic() - t.arrival_s,
            ttft_s=None if t.first_token_s is None else t.first_token_s - t.arrival_s,
            last_token_s=None if t.last_token_s is None else t.last_token_s - t.arrival_s,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            max_choice_tokens=max((c.num_tokens for row in self.choices for c in row), default=0),
            reasons=reasons,
        )


def _require(out: EngineOutput | None) -> EngineOutput:
    if out is None:
        raise GenerationFailed("The engine closed the request stream before every choice finished.", 500)
    return out
