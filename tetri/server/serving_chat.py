"""POST /v1/chat/completions: messages -> chat template -> engine -> `chat.completion[.chunk]`."""

from __future__ import annotations

import logging
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
from tetri.server.tokenizer import Tokenizer
from tetri.server.tool_calls import ToolPlan, plan_tools, template_inputs
from tetri.server.tool_parsers import CallDelta, ToolCall

log = logging.getLogger("tetri.server")


class ChatFormatter:
    """OpenAI chat shapes; vLLM's `prompt_token_ids` / `token_ids` when asked."""

    def __init__(self, req_id: str, model: str, tok: Tokenizer, n: int, prompt_ids: list[int], opts: ResponseOptions,
                 *, role: str = "assistant", echo: str = "", gen: Generation | None = None,
                 prompt_logprobs: int | None = None, tools: ToolPlan | None = None) -> None:
        self.base = {"id": req_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        self.tok = tok
        self.n = n
        self.prompt_ids = prompt_ids
        self.opts = opts
        self.role = role
        """vLLM's response role: "assistant", or the last message's without a generation prompt."""
        self.echo = echo
        """`echo`: the last message's content, prepended when it has the response's role."""
        self.gen = gen
        self.prompt_logprobs = prompt_logprobs
        self.tools = tools
        """Tool calling: each choice's text goes through a parser (`tool_parsers.py`)."""
        self._parsers: dict[int, object] = {}

    def head_chunks(self) -> list[dict]:
        chunks = []
        for i in range(self.n):
            chunk = {**self.base, "choices": [{"index": i, "delta": {"role": self.role, "content": ""}, "logprobs": None, "finish_reason": None}]}
            if self.opts.return_token_ids and i == 0:
                chunk["prompt_token_ids"] = self.prompt_ids
            chunks.append(chunk)
            if self.echo:
                chunks.append({**self.base, "choices": [{"index": i, "delta": {"content": self.echo}, "logprobs": None, "finish_reason": None}]})
        return chunks

    def chunk(self, up: ChoiceUpdate, usage: dict | None) -> dict | None:
        has_lp = bool(up.logprobs)
        parser = self._parser(up.index)
        if parser is None:
            delta = {"content": up.text} if up.text or up.finish_reason is None else {}
            finish, said = up.finish_reason, bool(up.text)
        else:
            parsed = parser.feed(up.text)
            if up.finish_reason is not None:
                parsed.extend(parser.finish())
            delta = self._tool_delta(parsed.content, parsed.calls)
            finish, said = self.tools.finish_reason(up.finish_reason, bool(parser.calls)), bool(delta)
        if not said and finish is None and not has_lp and not (self.opts.return_token_ids and up.token_ids):
            return None
        choice: dict = {
            "index": up.index,
            "delta": delta,
            "logprobs": {"content": self._logprobs(up.logprobs)} if up.logprobs is not None else None,
            "finish_reason": finish,
        }
        if self.opts.return_token_ids:
            choice["token_ids"] = up.token_ids
        chunk = {**self.base, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def _parser(self, index: int):
        if self.tools is None:
            return None
        if index not in self._parsers:
            self._parsers[index] = self.tools.parser()
        return self._parsers[index]

    def _tool_delta(self, content: str, calls: list[CallDelta]) -> dict:
        delta: dict = {"content": content} if content else {}
        if calls and self.tools.legacy:
            c = calls[0]
            delta["function_call"] = {"name": c.name, "arguments": c.arguments} if c.id else {"arguments": c.arguments}
        elif calls:
            delta["tool_calls"] = [
                {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                if c.id else {"index": c.index, "function": {"arguments": c.arguments}} for c in calls]
        return delta

    def _message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The message of a finished choice (its tool calls parsed out) and its finish reason."""
        parser = self.tools.parser() if self.tools is not None else None
        if parser is None:
            return {"role": self.role, "content": self.echo + text}, finish_reason
        parser.feed(text)
        parser.finish()
        calls: list[ToolCall] = parser.calls
        content = self.echo + parser.content
        message: dict = {"role": self.role, "content": content if content or not calls else None}
        if calls and self.tools.legacy:
            message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
        elif calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in calls]
        return message, self.tools.finish_reason(finish_reason, bool(calls))

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.base, "choices": [], "usage": usage}

    def response(self, choices: list[ChoiceAccum], usage: dict) -> dict:
        out = []
        for acc in choices:
            message, finish = self._message(acc.text, acc.finish_reason)
            choice: dict = {
                "index": acc.index,
                "message": message,
                "logprobs": {"content": self._logprobs(acc.logprobs)} if acc.logprobs is not None else None,
                "finish_reason": finish,
            }
            if self.opts.return_token_ids:
                choice["token_ids"] = acc.token_ids
            out.append(choice)
        body = {**self.base, "object": "chat.completion", "choices": out, "usage": usage}
        if self.opts.return_token_ids:
            body["prompt_token_ids"] = self.prompt_ids
        if self.prompt_logprobs is not None and self.gen is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(self.tok, self.gen.prompt_logprobs[0], self.prompt_logprobs)
        return body

    def _logprobs(self, entries: list[LogprobEntry] | None) -> list[dict]:
        return [self._entry(e.token_id, e.logprob, e.top) for e in entries or ()]

    def _entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        text, raw = self.tok.token_info(token_id)
        item = {"token": text, "logprob": clamp_logprob(logprob), "bytes": raw}
        item["top_logprobs"] = [self._top(t, lp) for t, lp in top]
        return item

    def _top(self, token_id: int, logprob: float) -> dict:
        text, raw = self.tok.token_info(token_id)
        return {"token": text, "logprob": clamp_logprob(logprob), "bytes": raw}


def _logprobs_param(req: schemas.ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def response_options(req: schemas.SamplingRequest) -> ResponseOptions:
    so = req.stream_options
    include_usage = bool(so and so.include_usage)
    return ResponseOptions(
        stream=bool(req.stream),
        include_usage=include_usage,
        continuous_usage=include_usage and bool(so and so.continuous_usage_stats),
        return_token_ids=bool(req.return_token_ids),
    )


def check_chat(req: schemas.ChatCompletionRequest | schemas.TokenizeChatRequest) -> None:
    if req.continue_final_message and req.add_generation_prompt:
        raise bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                          "continue_final_message")


async def render_chat(state, req, tools: ToolPlan | None = None) -> tuple[list[dict], list[int]]:
    """The messages as template dicts and the prompt ids (a template failure is a 400)."""
    check_chat(req)
    messages = schemas.chat_messages(req.messages)
    rendered, tool_dicts = template_inputs(messages, tools, state.tok.hf)
    size = sum(len(m["content"]) for m in rendered) + (len(str(tool_dicts)) if tool_dicts else 0)
    try:
        ids = await off_loop(lambda: state.tok.apply_chat_template(
            rendered, bool(req.add_generation_prompt), bool(req.continue_final_message), tools=tool_dicts), size)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    return messages, ids


def log_user(req_id: str, req: schemas.SamplingRequest) -> None:
    """OpenAI's `user` (an end-user id for abuse monitoring) and a json_schema's `name` and
    `description` (labels: the schema alone constrains the output): recorded in the server log."""
    if req.user is not None:
        log.info("%s: user=%r", req_id, req.user)
    fmt = req.response_format
    if isinstance(fmt, schemas.JsonSchemaFormat):
        log.info("%s: response_format json_schema name=%r description=%r", req_id, fmt.json_schema.name,
                 fmt.json_schema.description)


def _special_markers(tok: Tokenizer, tools: ToolPlan) -> bool:
    """Whether the hermes parser's markers are special tokens (then decoded, not skipped)."""
    if tools.parser_name != "hermes":
        return False
    special = set(getattr(tok.hf, "all_special_tokens", ()))
    return "<tool_call>" in special or "</tool_call>" in special


async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrival_s = time.monotonic()
    app = request.app
    cfg, engine, state = app[CONFIG], app[ENGINE], app[STATE]
    req = schemas.decode_request(await request.read(), schemas.ChatCompletionRequest)
    schemas.check_model(req.model, state.served_names)
    checks.check_stream_options(req)
    checks.check_best_of(req)
    tools = plan_tools(req, cfg)
    grammar = structured.request_grammar(req, tools.grammar if tools is not None else None)
    messages, ids = await render_chat(state, req, tools)
    ids = checks.truncate(ids, req, engine.max_model_len)
    schemas.check_prompt_ids(ids, state.tok.vocab_size, engine.max_model_len, "messages")
    use_mct = req.max_completion_tokens is not None
    max_tokens = schemas.resolve_max_tokens(
        req.max_completion_tokens if use_mct else req.max_tokens, None, len(ids), engine.max_model_len,
        cfg.max_tokens_cap, "max_completion_tokens" if use_mct else "max_tokens",
    )
    vocab = state.tok.vocab_size
    plp = checks.prompt_logprobs(req, vocab)
    lp = _logprobs_param(req)
    bias = checks.logit_bias(req, vocab)
    spec = await structured.checked(grammar, state.grammar, app[METRICS])
    params = schemas.sampling_params(req, max_tokens=max_tokens, logprobs=lp, max_n=cfg.max_n, logit_bias=bias,
                                     prompt_logprobs=plp, structured_outputs=spec)
    req_id = f"chatcmpl-{uuid.uuid4().hex}"
    log_user(req_id, req)
    gen = Generation(
        engine, state.tok, app[METRICS], req_id=req_id, prompts=[ids], params=params,
        stops=schemas.stop_strings(req), priority=req.priority or 0, arrival_s=arrival_s, drop_stop_logprob=True,
        keep_special=tools is not None and _special_markers(state.tok, tools),
    )
    role = "assistant" if req.add_generation_prompt else messages[-1]["role"]
    echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == role else ""
    opts = response_options(req)
    fmt = ChatFormatter(req_id, state.served_name, state.tok, params.n, ids, opts, role=role, echo=echo, gen=gen,
                        prompt_logprobs=plp, tools=tools)
    return await serve(request, gen, fmt, opts)
