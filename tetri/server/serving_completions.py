"""POST /v1/completions: prompt(s) -> engine -> `text_completion` (one choice set per prompt).

Choice indices follow OpenAI: prompt p's choice i is `p * n + i`.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from tetri.server import openai_schemas as schemas
from tetri.server import request_checks as checks
from tetri.server import structured
from tetri.server.errors import bad_request
from tetri.server.generation import ChoiceUpdate, Generation, LogprobEntry
from tetri.server.keys import CONFIG, ENGINE, METRICS, STATE
from tetri.server.serving import ChoiceAccum, ResponseOptions, clamp_logprob, off_loop, prompt_logprobs_json, serve
from tetri.server.serving_chat import log_user, response_options
from tetri.server.tokenizer import Tokenizer

MAX_PROMPTS = 256
DEFAULT_MAX_TOKENS = 16
"""OpenAI's and vLLM's default for the legacy completions API."""


class CompletionFormatter:
    """OpenAI `text_completion` shapes; vLLM's `prompt_token_ids` / `token_ids` when asked."""

    def __init__(self, req_id: str, model: str, tok: Tokenizer, n: int, prompts: list[list[int]], opts: ResponseOptions,
                 *, logprobs: int | None = None, echo_texts: list[str] | None = None, gen: Generation | None = None,
                 prompt_logprobs: int | None = None) -> None:
        self.base = {"id": req_id, "object": "text_completion", "created": int(time.time()), "model": model}
        self.tok = tok
        self.n = n
        self.prompts = prompts
        self.opts = opts
        self.logprobs = logprobs
        self.echo_texts = echo_texts
        """`echo`: each prompt's text, prepended to its choices (with the prompt's logprobs)."""
        self.gen = gen
        self.prompt_logprobs = prompt_logprobs
        self._started: set[int] = set()

    def head_chunks(self) -> list[dict]:
        return []

    def chunk(self, up: ChoiceUpdate, usage: dict | None) -> dict | None:
        has_lp = bool(up.logprobs)
        if not up.text and up.finish_reason is None and not has_lp and not (self.opts.return_token_ids and up.token_ids):
            return None
        first = up.index not in self._started
        text, entries = up.text, up.logprobs
        if first and self.echo_texts is not None:
            text, entries = self._echoed(up.index, text, entries)
        choice: dict = {
            "index": up.index,
            "text": text,
            "logprobs": self._logprobs(entries) if entries is not None else None,
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
            text, entries = acc.text, acc.logprobs
            if self.echo_texts is not None:
                text, entries = self._echoed(acc.index, text, entries)
            choice: dict = {
                "index": acc.index,
                "text": text,
                "logprobs": self._logprobs(entries) if entries is not None else None,
                "finish_reason": acc.finish_reason,
            }
            if self.opts.return_token_ids:
                choice["prompt_token_ids"] = self.prompts[acc.index // self.n]
                choice["token_ids"] = acc.token_ids
            if self.prompt_logprobs is not None and self.gen is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(
                    self.tok, self.gen.prompt_logprobs[acc.index // self.n], self.prompt_logprobs)
            out.append(choice)
        return {**self.base, "choices": out, "usage": usage}

    def _echoed(self, index: int, text: str, entries: list[LogprobEntry] | None):
        """The prompt's text (and, with logprobs, its tokens: the first unscored) before the output."""
        p = index // self.n
        prompt_text = self.echo_texts[p]
        if self.logprobs is None or self.gen is None:
            return prompt_text + text, entries
        ids = self.prompts[p]
        scored = self.gen.prompt_logprobs[p] or []
        echoed = [LogprobEntry(ids[0], None, [], 0)]  # type: ignore[arg-type] - nothing predicts the first token
        offset = len(self.tok.token_info(ids[0])[0])
        for lp in scored:
            echoed.append(LogprobEntry(lp.token_id, lp.logprob, list(lp.top), offset))
            offset += len(self.tok.token_info(lp.token_id)[0])
        shift = len(prompt_text)
        outs = [LogprobEntry(e.token_id, e.logprob, e.top, e.text_offset + shift) for e in entries or ()]
        return prompt_text + text, echoed + outs

    def _logprobs(self, entries: list[LogprobEntry] | None) -> dict:
        """OpenAI's completion logprobs; each top_logprobs dict holds the token itself and the
        `logprobs` most likely (vLLM's rule, so logprobs=0 gives the token's own entry)."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries or ():
            if e.logprob is None:  # the first echoed prompt token: nothing predicts it
                tokens.append(self.tok.token_info(e.token_id)[0])
                token_logprobs.append(None)
                top_logprobs.append(None)
                offsets.append(0)
                continue
            tokens.append(self.tok.token_info(e.token_id)[0])
            token_logprobs.append(clamp_logprob(e.logprob))
            top = {tokens[-1]: clamp_logprob(e.logprob)}
            for t, lp in e.top[: self.logprobs]:
                top.setdefault(self.tok.token_info(t)[0], clamp_logprob(lp))
            top_logprobs.append(top)
            offsets.append(e.text_offset)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


async def _prompt_ids(req: schemas.CompletionRequest, tok: Tokenizer, max_model_len: int) -> tuple[list[list[int]], list[str]]:
    """Each prompt's ids (after `suffix`'s fill-in-the-middle and truncation) and its echo text."""
    raw = schemas.completion_prompts(req)
    if len(raw) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request (got {len(raw)})", "prompt")
    if raw and isinstance(raw[0], str):
        texts: list[str] = raw  # type: ignore[assignment]
        model_texts = [checks.fim_prompt(tok, req, t) for t in texts] if req.suffix is not None else texts
        prompts = await off_loop(lambda: [tok.encode(t) for t in model_texts], sum(len(t) for t in texts))
    else:
        if req.suffix is not None:
            raise bad_request("suffix needs a text prompt", "suffix")
        prompts = [list(p) for p in raw]  # type: ignore[arg-type]
        texts = [tok.decode(p, skip_special_tokens=False) for p in prompts] if req.echo else [""] * len(prompts)
    for i, ids in enumerate(prompts):
        cut = checks.truncate(ids, req, max_model_len)
        if len(cut) != len(ids):
            prompts[i], texts[i] = cut, tok.decode(cut, skip_special_tokens=False)
        schemas.check_prompt_ids(prompts[i], tok.vocab_size, max_model_len, "prompt")
    return prompts, texts


async def completions(request: web.Request) -> web.StreamResponse:
    arrival_s = time.monotonic()
    app = request.app
    cfg, engine, state = app[CONFIG], app[ENGINE], app[STATE]
    req = schemas.decode_request(await request.read(), schemas.CompletionRequest)
    schemas.check_model(req.model, state.served_names)
    checks.check_stream_options(req)
    checks.check_best_of(req)
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be at least 1 (0 is for prompt scoring, with echo)", "max_tokens")
    prompts, texts = await _prompt_ids(req, state.tok, engine.max_model_len)
    max_tokens = schemas.resolve_max_tokens(
        req.max_tokens, DEFAULT_MAX_TOKENS, max(len(p) for p in prompts), engine.max_model_len, cfg.max_tokens_cap
    )
    vocab = state.tok.vocab_size
    plp = checks.prompt_logprobs(req, vocab, echo_logprobs=req.logprobs if req.echo else None)
    bias = checks.logit_bias(req, vocab)
    spec = await structured.checked(structured.request_grammar(req), state.grammar, app[METRICS])
    params = schemas.sampling_params(req, max_tokens=max(1, max_tokens), logprobs=req.logprobs, max_n=cfg.max_n,
                                     logit_bias=bias, prompt_logprobs=plp, structured_outputs=spec)
    req_id = f"cmpl-{uuid.uuid4().hex}"
    log_user(req_id, req)
    gen = Generation(
        engine, state.tok, app[METRICS], req_id=req_id, prompts=prompts, params=params,
        stops=schemas.stop_strings(req), priority=req.priority or 0, arrival_s=arrival_s,
        discard_output=max_tokens == 0,
    )
    opts = response_options(req)
    fmt = CompletionFormatter(req_id, state.served_name, state.tok, params.n, prompts, opts, logprobs=req.logprobs,
                              echo_texts=texts if req.echo else None, gen=gen,
                              prompt_logprobs=checks.prompt_logprobs(req, vocab))
    return await serve(request, gen, fmt, opts)
