"""The request fields that constrain an output to a grammar, turned into one
`StructuredOutputsParams` (or a 400 naming the field):

    response_format      {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}
                         (OpenAI's shape; `strict: true` is xgrammar's strict mode: nothing beyond
                         what the schema names; otherwise JSON Schema's own defaults)
    structured_outputs   vLLM's extra: exactly one of json, regex, choice, grammar, json_object,
                         structural_tag; `disable_any_whitespace` for the JSON kinds
    guided_*             vLLM's older names for the same (guided_json, guided_regex, guided_choice,
                         guided_grammar); guided_decoding_backend may only name xgrammar

At most one of them per request; tool calling's grammars (`tool_calls.py`) count as one too.
Whether the grammar compiles, and within the server's bounds, is `grammar_check.py`'s question.
"""

from __future__ import annotations

import json
from typing import Any

from tetri.server.errors import bad_request
from tetri.server.openai_schemas import JsonObjectFormat, JsonSchemaFormat, SamplingRequest
from tetri.types import StructuredOutputsParams

BACKENDS = ("xgrammar", "auto")
"""guided_decoding_backend values this server honours: it decodes every grammar with xgrammar."""
_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def schema_text(value: Any, param: str) -> str:
    """A JSON schema given as an object or as JSON text, as JSON text (key order kept: xgrammar
    generates properties in the order the schema lists them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc}", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object), got {type(value).__name__}", param)
    return json.dumps(value, ensure_ascii=False)


def _response_format(req: SamplingRequest) -> tuple[str, StructuredOutputsParams] | None:
    fmt = req.response_format
    if isinstance(fmt, JsonObjectFormat):
        return "response_format", StructuredOutputsParams(json_object=True)
    if isinstance(fmt, JsonSchemaFormat):
        param = "response_format.json_schema.schema"
        if fmt.json_schema.schema is None:
            raise bad_request("response_format json_schema needs its `schema`", param)
        return param, StructuredOutputsParams(json=schema_text(fmt.json_schema.schema, param),
                                              strict=bool(fmt.json_schema.strict))
    return None  # {"type": "text"}: plain text, as without it


def _structured_outputs(req: SamplingRequest) -> tuple[str, StructuredOutputsParams] | None:
    so = req.structured_outputs
    if so is None:
        return None
    given = [k for k in _KINDS if getattr(so, k) not in (None, False)]
    if len(given) != 1:
        raise bad_request(f"structured_outputs needs exactly one of {', '.join(_KINDS)} (got {', '.join(given) or 'none'})",
                          "structured_outputs")
    kind = given[0]
    param = f"structured_outputs.{kind}"
    if so.disable_any_whitespace is not None and kind not in ("json", "json_object"):
        raise bad_request("disable_any_whitespace applies to json and json_object only",
                          "structured_outputs.disable_any_whitespace")
    ws = not so.disable_any_whitespace
    if kind == "json":
        return param, StructuredOutputsParams(json=schema_text(so.json, param), any_whitespace=ws)
    if kind == "json_object":
        return param, StructuredOutputsParams(json_object=True, any_whitespace=ws)
    if kind == "choice":
        return param, StructuredOutputsParams(choice=_choices(so.choice, param))
    return param, StructuredOutputsParams(**{kind: getattr(so, kind)})


def _choices(choices: list[str], param: str) -> tuple[str, ...]:
    if any(not c for c in choices):
        raise bad_request("choices must be non-empty strings", param)
    return tuple(choices)


def _guided(req: SamplingRequest) -> list[tuple[str, StructuredOutputsParams]]:
    if req.guided_decoding_backend is not None and req.guided_decoding_backend not in BACKENDS:
        raise bad_request(f"guided_decoding_backend {req.guided_decoding_backend!r} is not available: this server "
                          "decodes structured outputs with xgrammar", "guided_decoding_backend")
    if req.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported by xgrammar; use "
                          "structured_outputs.disable_any_whitespace", "guided_whitespace_pattern")
    found = []
    if req.guided_json is not None:
        found.append(("guided_json", StructuredOutputsParams(json=schema_text(req.guided_json, "guided_json"))))
    if req.guided_regex is not None:
        found.append(("guided_regex", StructuredOutputsParams(regex=req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", StructuredOutputsParams(choice=_choices(req.guided_choice, "guided_choice"))))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutputsParams(grammar=req.guided_grammar)))
    return found


def request_grammar(req: SamplingRequest, tool_grammar: tuple[str, StructuredOutputsParams] | None = None
                    ) -> tuple[str, StructuredOutputsParams] | None:
    """(the field it came from, the spec) for the request's one grammar, or None."""
    found = [x for x in (_response_format(req), _structured_outputs(req)) if x is not None] + _guided(req)
    if tool_grammar is not None:
        found.insert(0, tool_grammar)
    if len(found) > 1:
        names = [p.split(".", 1)[0] for p, _ in found]
        raise bad_request(f"only one output constraint per request (got {' and '.join(names)})", found[1][0].split(".")[0])
    return found[0] if found else None


def spec_bytes(spec: StructuredOutputsParams) -> int:
    """The size of what the grammar is compiled from (bounded by --max-grammar-bytes)."""
    parts = (spec.json, spec.regex, spec.grammar, spec.structural_tag, *(spec.choice or ()))
    return sum(len(p.encode()) for p in parts if p)


async def checked(found: tuple[str, StructuredOutputsParams] | None, checker, metrics) -> StructuredOutputsParams | None:
    """The spec once the grammar check says it compiles (else its 400 propagates)."""
    if found is None:
        return None
    param, spec = found
    await checker.check(spec, param, metrics)
    return spec
