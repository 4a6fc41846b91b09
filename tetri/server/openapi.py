"""GET /openapi.json: an OpenAPI 3.1 document of the routes, request schemas from msgspec."""

from __future__ import annotations

import functools

import msgspec

from tetri.server.openai_schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                                         TokenizeCompletionRequest)

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}


def _errors(*statuses: int) -> dict:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {str(s): {"description": "error", **ref} for s in statuses}


def _generate(schema: str, summary: str) -> dict:
    body = {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
    ok = {
        "description": "JSON response, or an SSE stream (`text/event-stream`) of chunks ending in `data: [DONE]` when `stream` is true",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}},
    }
    return {"post": {"summary": summary, "requestBody": body, "responses": {"200": ok, **_errors(400, 401, 404, 413, 429, 500, 503)}}}


def _get(summary: str, content_type: str = "application/json", errors: tuple[int, ...] = (401,)) -> dict:
    ok = {"description": "OK", "content": {content_type: {"schema": {"type": "object" if "json" in content_type else "string"}}}}
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}}


def _post(schema: dict, summary: str) -> dict:
    body = {"required": True, "content": {"application/json": {"schema": schema}}}
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {"post": {"summary": summary, "requestBody": body, "responses": {"200": ok, **_errors(400, 401, 404)}}}


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict:
    _, components = msgspec.json.schema_components(
        (ChatCompletionRequest, CompletionRequest, TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest),
        ref_template="#/components/schemas/{name}",
    )
    tokenize_body = {"anyOf": [{"$ref": "#/components/schemas/TokenizeCompletionRequest"},
                               {"$ref": "#/components/schemas/TokenizeChatRequest"}]}
    components["Error"] = _ERROR
    return {
        "openapi": "3.1.0",
        "info": {"title": "tetri-serve", "version": "0.1.0", "description": "OpenAI-compatible LLM inference server"},
        "paths": {
            "/v1/chat/completions": _generate("ChatCompletionRequest", "Create a chat completion"),
            "/v1/completions": _generate("CompletionRequest", "Create a text completion"),
            "/v1/models": _get("List the served model (one card per served name)"),
            "/v1/models/{model}": _get("One served name's card (404 for any other)", errors=(401, 404)),
            "/tokenize": _post(tokenize_body, "Token ids of a text or chat prompt"),
            "/detokenize": _post({"$ref": "#/components/schemas/DetokenizeRequest"}, "Text of token ids"),
            "/version": _get("The server version"),
            "/health": {"get": {"summary": "200 when every needed worker role is live, else 503", "responses": {"200": {"description": "healthy"}, "503": {"description": "unhealthy"}}}},
            "/metrics": _get("Prometheus metrics", "text/plain"),
            "/workers": _get("Per-worker status rows"),
            "/openapi.json": _get("This document"),
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
