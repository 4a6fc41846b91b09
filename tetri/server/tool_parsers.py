"""Reading tool calls out of a choice's text, as it streams and at its end.

One parser per choice; `feed(text)` takes each new piece of detokenized text and returns what
can be said already (`Parsed`: content text, and call deltas in OpenAI's streaming shape),
`finish()` the rest. The non-streaming response feeds the whole text once. Formats:

    hermes       vLLM's `--tool-call-parser hermes` (Hermes 2 Pro, Qwen2.5 and Qwen3): content,
                 then calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    llama3_json  vLLM's `--tool-call-parser llama3_json` (Llama 3.1-3.3): an output that starts
                 with `{` (after the <|python_tag|> special token) is one or more
                 `{"name": ..., "parameters": {...}}` objects separated by `;`; any other output
                 is content
    required     tool_choice "required" (vLLM's grammar): a JSON array of
                 `{"name": ..., "parameters": {...}}`, one call per element
    named        a named tool_choice: the whole output is that function's arguments

A call is said whole (id, name and arguments in one delta) once its JSON is complete; a named
call streams its arguments as they come. A block that does not parse is content, as in vLLM.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

TOOL_PARSERS = ("hermes", "llama3_json")
"""The --tool-call-parser names (vLLM's) this server reads."""
_DECODER = json.JSONDecoder()


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str
    """JSON text of the arguments."""


@dataclass
class CallDelta:
    index: int
    id: str | None = None
    """Set on a call's first delta, with `name`."""
    name: str | None = None
    arguments: str = ""


@dataclass
class Parsed:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def extend(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.calls.extend(other.calls)
        return self


class _Parser:
    """What every format shares: completed calls, the content said, the call cap."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""
        self.max_calls = max_calls
        """parallel_tool_calls false: calls after the first are dropped (vLLM's rule)."""
        self.raw = ""

    def _say(self, out: Parsed, text: str) -> None:
        if text:
            out.content += text
            self.content += text

    def _call(self, out: Parsed, obj, args_keys: tuple[str, ...]) -> bool:
        """Add the call `obj` describes; False when it is no call (not an object with a name)."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return False
        args = next((obj[k] for k in args_keys if k in obj), {})
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            return True
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = ToolCall(call_id(), obj["name"], text)
        out.calls.append(CallDelta(len(self.calls), call.id, call.name, call.arguments))
        self.calls.append(call)
        return True


class HermesParser(_Parser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._buf = ""
        self._inside = False

    def feed(self, text: str) -> Parsed:
        self.raw += text
        self._buf += text
        out = Parsed()
        while True:
            if not self._inside:
                i = self._buf.find(self.START)
                if i < 0:
                    keep = _partial_suffix(self._buf, self.START)
                    self._outside(out, self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._outside(out, self._buf[:i])
                self._buf, self._inside = self._buf[i + len(self.START):], True
            else:
                j = self._buf.find(self.END)
                if j < 0:
                    return out
                self._block(out, self._buf[:j], closed=True)
                self._buf, self._inside = self._buf[j + len(self.END):], False

    def finish(self) -> Parsed:
        out = Parsed()
        if self._inside:
            self._block(out, self._buf, closed=False)  # unterminated at the end: vLLM reads it too
        else:
            self._outside(out, self._buf)
        self._buf = ""
        return out

    def _outside(self, out: Parsed, text: str) -> None:
        if self.calls and not text.strip():
            return  # the whitespace between calls is no content
        self._say(out, text)

    def _block(self, out: Parsed, text: str, closed: bool) -> None:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not self._call(out, obj, ("arguments", "parameters")):
            self._say(out, self.START + text + (self.END if closed else ""))


class _JsonSequence(_Parser):
    """JSON values one after another (with separators between); each complete one a call."""

    SEPARATORS = " \t\r\n;,"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._buf = ""
        self._failed = False

    def _drain(self, out: Parsed, args_keys: tuple[str, ...]) -> None:
        while not self._failed:
            pos = len(self._buf) - len(self._buf.lstrip(self.SEPARATORS))
            if pos == len(self._buf) or self._buf[pos] in "]":
                self._buf = self._buf[pos:]
                return
            try:
                obj, end = _DECODER.raw_decode(self._buf, pos)
            except ValueError:
                return  # incomplete: wait for more text
            if not self._call(out, obj, args_keys):
                self._failed = True
                return
            self._buf = self._buf[end:]

    def _rest_as_content(self, out: Parsed, tail: str) -> None:
        """At the end: what never parsed is content (all of it when no call was read)."""
        if not self.calls:
            self._say(out, self.raw)
        elif tail.strip(self.SEPARATORS + "]"):
            self._say(out, tail)


class Llama3JsonParser(_JsonSequence):
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._mode: str | None = None

    def feed(self, text: str) -> Parsed:
        self.raw += text
        out = Parsed()
        if self._mode is None:
            head = self.raw.lstrip()
            if not head or self.PYTHON_TAG.startswith(head):
                return out
            self._mode = "calls" if head.startswith(("{", self.PYTHON_TAG)) else "content"
            text = self.raw
        if self._mode == "content":
            self._say(out, text)
            return out
        self._buf += text.replace(self.PYTHON_TAG, "")
        self._drain(out, ("parameters", "arguments"))
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        if self._mode is None:
            self._say(out, self.raw)
        elif self._mode == "calls":
            self._drain(out, ("parameters", "arguments"))
            self._rest_as_content(out, self._buf)
        return out


class RequiredParser(_JsonSequence):
    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._opened = False

    def feed(self, text: str) -> Parsed:
        self.raw += text
        out = Parsed()
        self._buf += text
        if not self._opened:
            head = self._buf.lstrip()
            if not head:
                return out
            if not head.startswith("["):
                self._failed = True
                return out
            self._opened, self._buf = True, head[1:]
        self._drain(out, ("parameters", "arguments"))
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        self._rest_as_content(out, self._buf)
        return out


class NamedParser(_Parser):
    """The output is `name`'s arguments: streamed as they come."""

    def __init__(self, name: str) -> None:
        super().__init__(1)
        self.call = ToolCall(call_id(), name, "")
        self.calls = [self.call]
        self._started = False

    def feed(self, text: str) -> Parsed:
        self.raw += text
        if not text:
            return Parsed()
        self.call.arguments += text
        return Parsed(calls=[self._delta(text)])

    def finish(self) -> Parsed:
        return Parsed() if self._started else Parsed(calls=[self._delta("")])

    def _delta(self, text: str) -> CallDelta:
        if self._started:
            return CallDelta(0, arguments=text)
        self._started = True
        return CallDelta(0, self.call.id, self.call.name, text)


def make_parser(kind: str, *, max_calls: int | None = None, name: str | None = None):
    if kind == "hermes":
        return HermesParser(max_calls)
    if kind == "llama3_json":
        return Llama3JsonParser(max_calls)
    if kind == "required":
        return RequiredParser(max_calls)
    if kind == "named":
        return NamedParser(name or "")
    raise ValueError(f"unknown tool-call parser {kind!r}; known: {', '.join(TOOL_PARSERS)}")


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (held back while streaming)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
