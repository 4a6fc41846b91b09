"""POST /v1/completions: prompt(s) -> engine -> `text_completion` (one choice set per prompt).

Choice indices follow OpenAI: prompt p's choice i is `p * n + i`.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from tetri.server import openai_schemas as schemas
from tetri.server.errors import bad_request
from tetri.server.generation import ChoiceUpdate, Generation, LogprobEntry
from tetri.server.keys import CONFIG, ENGINE, METRICS, STATE
from tetri.server.serving import ChoiceAccum, ResponseOptions, clamp_logprob, off_loop, serve
from tetri.server.serving_chat import response_options
from tetri.server.tokenizer import Tokenizer

MAX_PROMPTS = 256
DEFAULT_MAX_TOKENS = 16
"""OpenAI's and vLLM's default for the legacy completions API."""


class CompletionFormatter:
    """OpenAI `text_completion` shapes; vLLM's `prompt_token_ids` / `token_ids` when asked."""

    def __init__(self, req_id: str, model: str, tok: Tokenizer, n: int, prompts: list[list[int]], opts: ResponseOptions) -> None:
        self.base = {"id": req_id, "object": "text_completion", "created": int(time.time()), "model": model}
        self.tok = tok
        self.n = n
        self.prompts = prompts
        self.opts = opts
        self._started: set[int] = set()

    def head_chunks(self) -> list[dict]:
        return []

    def chunk(self, up: ChoiceUpdate, usage: dict | None) -> dict | None:
        has_lp = bool(up.logprobs)
        if not up.text and up.finish_reason is None and not has_lp and not (self.opts.return_token_ids and up.token_ids):
            return None
        choice: dict = {
            "index": up.index,
            "text": up.text,
            "logprobs": self._logprobs(up.logprobs) if up.logprobs is not None else None,
            "finish_reason": up.finish_reason,
        }
        if self.opts.return_token_ids:
            if up.index not in self._started:
                choice["prompt_token_ids"] = self.prompts[up.index // self.n]
            choice["token_ids"] = up.token_ids
        self._started.add(up.index)
        chunk = {**self.base, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.base, "choices": [], "usage": usage}

    def response(self, choices: list[ChoiceAccum], usage: dict) -> dict:
        out = []
        for acc in choices:
            choice: dict = {
                "index": acc.index,
                "text": acc.text,
                "logprobs": self._logprobs(acc.logprobs) if acc.logprobs is not None else None,
                "finish_reason": acc.finish_reason,
            }
            if self.opts.return_token_ids:
                choice["prompt_token_ids"] = self.prompts[acc.index // self.n]
                choice["token_ids"] = acc.token_ids
            out.append(choice)
        return {**self.base, "choices": out, "usage": usage}

    def _logprobs(self, entries: list[LogprobEntry] | None) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries or ():
            tokens.append(self.tok.token_info(e.token_id)[0])
            token_logprobs.append(clamp_logprob(e.logprob))
            top_logprobs.append({self.tok.token_info(t)[0]: clamp_logprob(lp) for t, lp in e.top})
            offsets.append(e.text_offset)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


async def _prompt_ids(req: schemas.CompletionRequest, tok: Tokenizer, max_model_len: int) -> list[list[int]]:
    raw = schemas.completion_prompts(req)
    if len(raw) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request (got {len(raw)})", "prompt")
    if raw and isinstance(raw[0], str):
        texts: list[str] = raw  # type: ignore[assignment]
        prompts = await off_loop(lambda: [tok.encode(t) for t in texts], sum(len(t) for t in texts))
    else:
        prompts = [list(p) for p in raw]  # type: ignore[arg-type]
    for ids in prompts:
        schemas.check_prompt_ids(ids, tok.vocab_size, max_model_len, "prompt")
    return prompts


async def completions(request: web.Request) -> web.StreamResponse:
    arrival_s = time.monotonic()
    app = request.app
    cfg, engine, state = app[CONFIG], app[ENGINE], app[STATE]
    req = schemas.decode_request(await request.read(), schemas.CompletionRequest)
    schemas.check_model(req.model, state.served_name)
    if req.echo:
        raise bad_request("echo is not supported", "echo")
    prompts = await _prompt_ids(req, state.tok, engine.max_model_len)
    max_tokens = schemas.resolve_max_tokens(
        req.max_tokens, DEFAULT_MAX_TOKENS, max(len(p) for p in prompts), engine.max_model_len, cfg.max_tokens_cap
    )
    params = schemas.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, max_n=cfg.max_n)
    req_id = f"cmpl-{uuid.uuid4().hex}"
    gen = Generation(
        engine, state.tok, app[METRICS], req_id=req_id, prompts=prompts, params=params,
        stops=schemas.stop_strings(req), priority=req.priority or 0, arrival_s=arrival_s,
    )
    opts = response_options(req)
    fmt = CompletionFormatter(req_id, state.served_name, state.tok, params.n, prompts, opts)
    return await serve(request, gen, fmt, opts)
