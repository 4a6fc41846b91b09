"""`FakeEngineClient`: the `EngineClient` contract with scripted, deterministic tokens.

Every request runs as an asyncio task that emits one token per open choice per step (a step
every `token_delay_s`, or every loop turn when 0) into its `RequestStream`. Tokens come from
a `random.Random` seeded by (prompt ids, seed or `default_seed`, choice index), drawn from
printable token ids of the model's tokenizer, or cycle through `script` when given. The
fake honours max_tokens, min_tokens, ignore_eos (EOS only after `eos_after` tokens when
set), stop_token_ids, n, logprobs and prompt_logprobs (well-formed made-up values), max_model_len and aborts,
and records what it was sent (`submitted`, `aborted`) for tests to inspect. It applies no grammar
(`structured_outputs` is recorded, not enforced: the workers enforce it; a test scripts the text). Knobs:
`max_queue` (Overloaded beyond it), `is_healthy` (False: Unavailable and /health 503),
`error_after` (fail every request with an engine error after that many tokens).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from tetri.server.engine_api import ChoiceDelta, EngineOutput, EngineRequest, Overloaded, RequestStream, Unavailable
from tetri.types import TokenLogprob

EOS_ID = 1


@dataclass
class _Choice:
    index: int
    rng: random.Random
    produced: int = 0
    finish: str | None = None
    abort: bool = False


@dataclass
class _Running:
    req: EngineRequest
    stream: RequestStream
    choices: list[_Choice]
    abort_all: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)


def printable_token_ids(model_dir: str) -> list[int]:
    """Ids whose text is non-empty printable ASCII (no specials, no partial characters)."""
    from tetri.server.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    special = set(getattr(tok.hf, "all_special_ids", ()))
    out = []
    for i in range(len(tok.hf)):
        text = tok.decode([i], skip_special_tokens=False)
        if i not in special and text and text.isascii() and text.isprintable():
            out.append(i)
    return out


class FakeEngineClient:
    """In-process stand-in for the real engine client (see the module docstring)."""

    def __init__(
        self,
        model_dir: str,
        max_model_len: int = 2048,
        token_delay_s: float = 0.0,
        vocab_size: int = 512,
        *,
        eos_after: int | None = None,
        max_queue: int | None = None,
        script: Sequence[int] | None = None,
        token_ids: Sequence[int] | None = None,
        error_after: int | None = None,
        default_seed: int = 0,
    ) -> None:
        self.model_dir = model_dir
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.vocab_size = vocab_size
        self.eos_after = eos_after
        self.max_queue = max_queue
        self.script = list(script) if script else None
        self.error_after = error_after
        self.default_seed = default_seed
        self.is_healthy = True
        self.metrics = None  # create_app hands its Metrics here, as for the real client
        self.submitted: list[EngineRequest] = []
        self.aborted: list[tuple[str, int | None]] = []
        self.started = False
        self._pool = list(token_ids) if token_ids else None
        self._running: dict[str, _Running] = {}

    async def start(self) -> None:
        if self._pool is None:
            loop = asyncio.get_running_loop()
            try:
                self._pool = await loop.run_in_executor(None, printable_token_ids, self.model_dir)
            except Exception:  # noqa: BLE001 - no tokenizer: any non-special id will do
                self._pool = list(range(4, self.vocab_size))
        self.started = True

    async def close(self) -> None:
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()
        self.started = False

    def submit(self, req: EngineRequest) -> RequestStream:
        if not self.is_healthy:
            raise Unavailable("no live worker (fake engine marked unhealthy)")
        if self.max_queue is not None and len(self._running) >= self.max_queue:
            raise Overloaded(f"admission queue full ({self.max_queue} requests)")
        if req.req_id in self._running:
            raise ValueError(f"duplicate req_id {req.req_id}")
        self.submitted.append(req)
        n = req.params.n
        seed = req.params.seed if req.params.seed is not None else self.default_seed
        key = f"{seed}|{','.join(map(str, req.prompt_token_ids))}"
        choices = [_Choice(i, random.Random(f"{key}|{i}")) for i in range(n)]
        run = _Running(req, RequestStream(req.req_id, n), choices)
        self._running[req.req_id] = run
        run.task = asyncio.get_running_loop().create_task(self._run(run))
        return run.stream

    def abort(self, req_id: str, index: int | None = None) -> None:
        self.aborted.append((req_id, index))
        run = self._running.get(req_id)
        if run is None:
            return
        if index is None:
            run.abort_all = True
        elif 0 <= index < len(run.choices):
            run.choices[index].abort = True

    def healthy(self) -> bool:
        return self.is_healthy

    def workers(self) -> list[dict]:
        running = len(self._running)
        return [
            {
                "worker_id": 0, "role": "mixed", "device": "cpu", "pid": os.getpid(), "state": "ready",
                "kv_blocks_used": min(running, 1024), "kv_blocks_total": 1024, "running": running, "waiting": 0, "restarts": 0,
            }
        ]

    def num_running(self) -> int:
        return len(self._running)

    async def _run(self, run: _Running) -> None:
        try:
            first = True
            while any(c.finish is None for c in run.choices):
                if self.token_delay_s > 0:
                    await asyncio.sleep(self.token_delay_s)
                else:
                    await asyncio.sleep(0)
                out = self._step(run)
                if first:
                    out.queue_time_s, first = 0.0, False
                    out.prompt_logprobs = self._prompt_logprobs(run.req)
                run.stream.put(out)
                if out.error is not None:
                    return
        finally:
            self._running.pop(run.req.req_id, None)

    def _step(self, run: _Running) -> EngineOutput:
        deltas = []
        for ch in run.choices:
            if ch.finish is not None:
                continue
            if run.abort_all or ch.abort:
                ch.finish = "abort"
                deltas.append(ChoiceDelta(index=ch.index, token_ids=[], finish_reason="abort"))
                continue
            if self.error_after is not None and ch.produced >= self.error_after:
                for c in run.choices:
                    c.finish = c.finish or "error"
                return EngineOutput(req_id=run.req.req_id, choices=deltas, error="fake engine failure")
            deltas.append(self._token(run.req, ch))
        return EngineOutput(req_id=run.req.req_id, choices=deltas)

    def _token(self, req: EngineRequest, ch: _Choice) -> ChoiceDelta:
        p = req.params
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos and self.eos_after is not None and ch.produced >= max(self.eos_after, p.min_tokens):
            tok, ch.finish = EOS_ID, "stop"
        else:
            tok = self._draw(ch, stop_ids if ch.produced < p.min_tokens else set())
            if tok in stop_ids:
                ch.finish = "stop"
        ch.produced += 1
        if ch.finish is None and (ch.produced >= p.max_tokens or len(req.prompt_token_ids) + ch.produced >= self.max_model_len):
            ch.finish = "length"
        logprobs = None if p.logprobs is None else [self._logprob(ch.rng, tok, p.logprobs)]
        return ChoiceDelta(index=ch.index, token_ids=[tok], logprobs=logprobs, finish_reason=ch.finish)

    def _prompt_logprobs(self, req: EngineRequest) -> list[TokenLogprob] | None:
        """Made-up but well-formed prompt logprobs (prompt tokens 1..), when asked for."""
        k = req.params.prompt_logprobs
        if k is None:
            return None
        rng = random.Random(f"prompt|{','.join(map(str, req.prompt_token_ids))}")
        out = []
        for tok in req.prompt_token_ids[1:]:
            lp = self._logprob(rng, tok, k)
            out.append(TokenLogprob(tok, lp.logprob, lp.top, 1 + rng.randrange(50)))
        return out

    def _draw(self, ch: _Choice, banned: set[int]) -> int:
        pool = self._pool or list(range(4, self.vocab_size))
        if self.script:
            tok = self.script[ch.produced % len(self.script)]
        else:
            tok = pool[ch.rng.randrange(len(pool))]
        if tok in banned:
            tok = next((t for t in pool if t not in banned), tok)
        return tok

    def _logprob(self, rng: random.Random, tok: int, k: int) -> TokenLogprob:
        pool = self._pool or list(range(4, self.vocab_size))
        lp = -rng.random() * 2.0
        top = [(tok, lp)] if k else []
        while len(top) < k:
            top.append((pool[rng.randrange(len(pool))], lp - rng.random() * 3.0 - len(top)))
        return TokenLogprob(tok, lp, top)
