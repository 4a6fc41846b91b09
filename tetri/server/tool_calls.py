"""Tool calling on /v1/chat/completions, after OpenAI's API and vLLM's serving of it.

`plan_tools(req, cfg)` reads `tools` + `tool_choice` (or the legacy `functions` +
`function_call`) into a `ToolPlan`:

    none       the tools are rendered into the prompt; the output is content
    auto       the default with tools; needs --enable-auto-tool-choice and --tool-call-parser
               (else a 400, as vLLM answers); the model decides, the parser reads its calls.
               When any tool is `strict`, the calls are constrained too (xgrammar structural
               tag: free text until the parser's call marker, then the tool's schema)
    required   vLLM's grammar: a JSON array of {"name", "parameters"} objects over the tools
               (one at most with parallel_tool_calls false); finish_reason "tool_calls"
    named      the output is the named function's arguments, under its parameters' schema;
               finish_reason stays "stop" (OpenAI's and vLLM's)

The tools reach the model through the checkpoint's chat template
(`apply_chat_template(tools=...)`). A template that never mentions `tools` would drop them
silently, so they are then given as a system message in Hermes' format (the one the hermes
parser reads); likewise an assistant's earlier `tool_calls` go into its content when the
template does not render them. Legacy requests are answered in the legacy shape
(`message.function_call`, finish_reason "function_call").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from tetri.config import ServerConfig
from tetri.server.errors import bad_request
from tetri.server.openai_schemas import ChatCompletionRequest, FunctionDef, NamedFunction, NamedToolChoice
from tetri.server.tool_parsers import make_parser
from tetri.types import StructuredOutputsParams

AUTO_NEEDS_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
ANY_OBJECT = {"type": "object"}
HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>{tools}</tools> For each function call "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags as follows:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>"
)
CALL_MARKERS = {  # parser -> (trigger, call prefix with {name}, call suffix): what a constrained auto call looks like
    "hermes": ("<tool_call>", '<tool_call>\n{{"name": "{name}", "arguments": ', "}\n</tool_call>"),
    "llama3_json": ('{"name": ', '{{"name": "{name}", "parameters": ', "}"),
}


@dataclass
class ToolPlan:
    functions: list[FunctionDef]
    mode: str
    """"none" | "auto" | "required" | "named"."""
    legacy: bool
    parallel: bool
    parser_name: str | None = None
    named: str | None = None
    grammar: tuple[str, StructuredOutputsParams] | None = None
    """(the field it comes from, the spec) when the calls are constrained."""

    @property
    def template_tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": msgspec.to_builtins(fn)} for fn in self.functions]

    def parser(self):
        """A fresh parser for one choice (None: tool_choice "none", the output is content)."""
        cap = None if self.parallel else 1
        if self.mode == "auto":
            return make_parser(self.parser_name, max_calls=cap)
        if self.mode == "required":
            return make_parser("required", max_calls=cap)
        if self.mode == "named":
            return make_parser("named", name=self.named)
        return None

    def finish_reason(self, reason: str | None, made_calls: bool) -> str | None:
        if reason == "stop" and made_calls and self.mode in ("auto", "required"):
            return "function_call" if self.legacy else "tool_calls"
        return reason


def plan_tools(req: ChatCompletionRequest, cfg: ServerConfig) -> ToolPlan | None:
    legacy = req.functions is not None or req.function_call is not None
    if legacy and (req.tools is not None or req.tool_choice is not None):
        raise bad_request("functions/function_call cannot be combined with tools/tool_choice", "functions")
    fns = list(req.functions or ()) if legacy else [t.function for t in req.tools or ()]
    choice = req.function_call if legacy else req.tool_choice
    list_field, choice_field = ("functions", "function_call") if legacy else ("tools", "tool_choice")
    if req.tools == [] or req.functions == []:
        raise bad_request(f"{list_field} must not be empty (leave it out for no tools)", list_field)
    if not fns:
        if choice not in (None, "none"):
            raise bad_request(f"When using `{choice_field}`, `{list_field}` must be set.", choice_field)
        if req.parallel_tool_calls is not None:
            raise bad_request("parallel_tool_calls needs tools", "parallel_tool_calls")
        return None
    names = [fn.name for fn in fns]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise bad_request(f"function names must be unique (got {dup!r} twice)", list_field)
    plan = ToolPlan(fns, "auto", legacy, parallel=not legacy and req.parallel_tool_calls is not False)
    if isinstance(choice, (NamedToolChoice, NamedFunction)):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        fn = next((f for f in fns if f.name == name), None)
        if fn is None:
            raise bad_request(f"{choice_field} names {name!r}, which is not among the {list_field}", choice_field)
        plan.mode, plan.named = "named", name
        plan.grammar = (choice_field, StructuredOutputsParams(json=_schema_text(fn.parameters), strict=bool(fn.strict)))
    elif choice in ("none", "required"):
        plan.mode = choice
        if choice == "required":
            plan.grammar = (choice_field, StructuredOutputsParams(json=json.dumps(required_schema(fns, plan.parallel)),
                                                                  strict=all(fn.strict for fn in fns)))
    else:
        if not (cfg.enable_auto_tool_choice and cfg.tool_call_parser):
            raise bad_request(AUTO_NEEDS_FLAGS, choice_field)
        plan.parser_name = cfg.tool_call_parser
        if any(fn.strict for fn in fns):
            plan.grammar = (list_field, StructuredOutputsParams(structural_tag=auto_structural_tag(
                fns, cfg.tool_call_parser, plan.parallel)))
    return plan


def _schema_text(parameters: dict | None) -> str:
    return json.dumps(parameters if parameters is not None else ANY_OBJECT, ensure_ascii=False)


def required_schema(fns: list[FunctionDef], parallel: bool) -> dict:
    """vLLM's grammar for tool_choice "required": an array of calls, one schema per function,
    with every function's `$defs` lifted to the top (their `$ref`s point there)."""
    defs: dict[str, Any] = {}
    variants = []
    for fn in fns:
        params = dict(fn.parameters if fn.parameters is not None else ANY_OBJECT)
        for name, sub in params.pop("$defs", {}).items():
            if name in defs and defs[name] != sub:
                raise bad_request(f"tools define $defs {name!r} twice, differently", "tools")
            defs[name] = sub
        variants.append({"type": "object", "properties": {"name": {"type": "string", "enum": [fn.name]},
                                                          "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def auto_structural_tag(fns: list[FunctionDef], parser: str, parallel: bool) -> str:
    """xgrammar structural tag for auto mode with strict tools: text until the parser's call
    marker, then one of the tools' calls in that parser's format, its arguments under the tool's
    schema."""
    trigger, begin, end = CALL_MARKERS[parser]
    tags = [{"type": "tag", "begin": begin.format(name=fn.name),
             "content": {"type": "json_schema", "json_schema": fn.parameters if fn.parameters is not None else ANY_OBJECT},
             "end": end} for fn in fns]
    fmt = {"type": "triggered_tags", "triggers": [trigger], "tags": tags, "stop_after_first": not parallel}
    return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)


def _template_source(hf_tokenizer, with_tools: bool) -> str:
    tpl = getattr(hf_tokenizer, "chat_template", None) or ""
    if isinstance(tpl, dict):
        return tpl.get("tool_use", tpl.get("default", "")) if with_tools else tpl.get("default", "")
    return tpl


def template_inputs(messages: list[dict], plan: ToolPlan | None, hf_tokenizer) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for `apply_chat_template`, with the fallbacks for a template that does
    not render tools or earlier tool calls (see the module docstring)."""
    source = _template_source(hf_tokenizer, plan is not None)
    if any("tool_calls" in m for m in messages) and "tool_calls" not in source:
        messages = [_calls_as_content(m) for m in messages]
    if plan is None:
        return messages, None
    tools = plan.template_tools
    if "tools" in source:
        return messages, tools
    system = HERMES_SYSTEM.format(tools=json.dumps(tools, ensure_ascii=False))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{system}"}, *messages[1:]], None
    return [{"role": "system", "content": system}, *messages], None


def _calls_as_content(msg: dict) -> dict:
    if "tool_calls" not in msg:
        return msg
    calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                                   ensure_ascii=False) + "\n</tool_call>" for c in msg["tool_calls"])
    rest = {k: v for k, v in msg.items() if k != "tool_calls"}
    rest["content"] = f"{msg['content']}\n{calls}" if msg["content"] else calls
    return rest
