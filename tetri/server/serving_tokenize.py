"""POST /tokenize and /detokenize, with vLLM's request and response shapes.

    /tokenize    {"prompt": str, "add_special_tokens": true}              (text)
                 {"messages": [...], "add_generation_prompt": true, ...}  (chat: the rendered template)
                 -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"tokens": [ids]} -> {"prompt": str}
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from tetri.server import openai_schemas as schemas
from tetri.server.errors import bad_request
from tetri.server.keys import ENGINE, STATE
from tetri.server.serving_chat import render_chat


def _json(payload: object) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), content_type="application/json")


async def tokenize(request: web.Request) -> web.Response:
    engine, state = request.app[ENGINE], request.app[STATE]
    body = await request.read()
    try:
        is_chat = isinstance(raw := msgspec.json.decode(body), dict) and "messages" in raw
    except msgspec.DecodeError as exc:
        raise bad_request(f"Malformed JSON body: {exc}") from None
    if is_chat:
        req = schemas.decode_request(body, schemas.TokenizeChatRequest)
        schemas.check_model(req.model, state.served_names)
        _, ids = await render_chat(state, req)
        if req.add_special_tokens:
            ids = state.tok.encode(state.tok.decode(ids, skip_special_tokens=False), add_special_tokens=True)
    else:
        req = schemas.decode_request(body, schemas.TokenizeCompletionRequest)
        schemas.check_model(req.model, state.served_names)
        ids = state.tok.encode(req.prompt, add_special_tokens=bool(req.add_special_tokens))
    strs = state.tok.hf.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return _json({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = schemas.decode_request(await request.read(), schemas.DetokenizeRequest)
    schemas.check_model(req.model, state.served_names)
    bad = next((t for t in req.tokens if t >= state.tok.vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary (size {state.tok.vocab_size}).", "tokens")
    return _json({"prompt": state.tok.decode(req.tokens)})
