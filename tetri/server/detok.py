"""Incremental detokenization and stop-string matching, one instance per output choice.

`IncrementalDetokenizer` turns a stream of token ids into a stream of text that never holds a
broken UTF-8 sequence: with vLLM's prefix-offset / read-offset technique it decodes a short
window of recent ids twice (up to the read offset, and with the new id) and emits the
difference, holding everything back while the window's text ends in U+FFFD (a multi-byte
character still waiting for its remaining tokens). `flush()` at the end releases whatever is
left, so the concatenation equals `decode(all ids)`.

`StopMatcher` works on that text: it finds the earliest stop string across token boundaries
and, while streaming, holds back only the tail that could still become a stop string, so a
stop string is never partially emitted and never appears in the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

_REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5
"""Prompt ids decoded ahead of the output so the first token's leading space renders right."""


class IncrementalDetokenizer:
    """Feed ids with `step`, get new text; call `flush` once after the last id."""

    def __init__(self, decode: Decode, prompt_tail: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_tail[-PROMPT_CONTEXT_TOKENS:]) if prompt_tail else []
        self._prefix_text = self._decode(self._ids) if self._ids else ""
        if self._prefix_text.endswith(_REPLACEMENT):
            self._ids, self._prefix_text = [], ""  # a prompt cut mid-character is no help
        self._read = len(self._ids)  # ids[:read] were already emitted (ids[0:] is the window)

    def step(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is pending)."""
        self._ids.append(token_id)
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._advance(new_text)

    def flush(self) -> str:
        """Release the held-back text (possibly ending in U+FFFD) after the last token."""
        if self._read == len(self._ids):
            return ""
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text):
            return ""
        return self._advance(new_text)

    def _advance(self, new_text: str) -> str:
        out = new_text[len(self._prefix_text) :]
        # The window slides: what was read becomes the new prefix context.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return out


class StopMatcher:
    """Earliest-match stop strings over a text stream, with a minimal hold-back tail."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._first_chars = {s[0] for s in self.stops}
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string matched). After a match the
        emitted text ends right before the stop string and the matcher must not be fed again."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        cut, matched = self._find(buf)
        if matched is not None:
            self._pending = ""
            self.matched = matched
            return buf[:cut], True
        hold = self._hold_len(buf)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back tail, once the stream ended without a match."""
        out, self._pending = self._pending, ""
        return out

    def _find(self, buf: str) -> tuple[int, str | None]:
        best, best_stop = len(buf) + 1, None
        for stop in self.stops:
            pos = buf.find(stop)
            if 0 <= pos < best:
                best, best_stop = pos, stop
        return best, best_stop

    def _hold_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for i in range(max(0, len(buf) - self._max_hold), len(buf)):
            if buf[i] in self._first_chars:
                tail = buf[i:]
                if any(s.startswith(tail) for s in self.stops):
                    return len(buf) - i
        return 0
