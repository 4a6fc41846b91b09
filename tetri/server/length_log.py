"""`--log-lengths DIR`: record (features, actual output length) of served requests so the
length predictor can be retrained from real traffic.

One JSONL line per finished choice, in `DIR/lengths-<pid>.jsonl`, in the format
`tetri-predictor train` reads: `prompt` (text), `output_tokens`, plus `finish_reason`
("stop" lines are natural lengths; "length" lines were cut by max_tokens), `prompt_tokens`
and, when the prefill workers report it, `hidden` (the probe's features).

A request is forgotten when its last choice finishes, or on `forget` (abort, failure): the
log never holds more than the requests in flight. Lines are written by a writer thread
(the event loop never waits on the file); the prompt may be given as a
`concurrent.futures.Future` of its text (decoded off the loop), which the writer resolves.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Entry:
    prompt: str | Future | None
    prompt_tokens: int
    num_choices: int = 1
    hidden: list[float] | None = None
    counts: dict[int, int] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)


class LengthLog:
    def __init__(self, out_dir: str) -> None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"lengths-{os.getpid()}.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._live: dict[str, _Entry] = {}
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_lines, name="tetri-length-log", daemon=True)
        self._writer.start()

    @property
    def num_live(self) -> int:
        """Requests being tracked (in flight)."""
        return len(self._live)

    def start(self, req_id: str, prompt: str | Future | None, prompt_tokens: int, num_choices: int = 1) -> None:
        self._live[req_id] = _Entry(prompt, prompt_tokens, num_choices)

    def on_prefilled(self, req_id: str, hidden, first_tokens: list[int], finish_reasons: list[str | None]) -> None:
        entry = self._live.get(req_id)
        if entry is None:
            return
        entry.hidden = hidden
        for choice in range(len(first_tokens)):
            self.on_token(req_id, choice, finish_reasons[choice] if finish_reasons else None)

    def on_token(self, req_id: str, choice: int, finish_reason: str | None) -> None:
        entry = self._live.get(req_id)
        if entry is None or choice in entry.finished:
            return
        entry.counts[choice] = entry.counts.get(choice, 0) + 1
        if finish_reason is None:
            return
        entry.finished.add(choice)
        self._lines.put((entry.prompt, entry.counts[choice], finish_reason, entry.prompt_tokens, entry.hidden))
        if len(entry.finished) >= entry.num_choices:
            del self._live[req_id]

    def forget(self, req_id: str) -> None:
        self._live.pop(req_id, None)

    def _write_lines(self) -> None:
        while True:
            item = self._lines.get()
            if item is None:
                return
            prompt, output_tokens, finish_reason, prompt_tokens, hidden = item
            if isinstance(prompt, Future):
                try:
                    prompt = prompt.result()
                except Exception:  # the decode failed or was cancelled at shutdown
                    prompt = None
            line = {"prompt": prompt, "output_tokens": output_tokens, "finish_reason": finish_reason,
                    "prompt_tokens": prompt_tokens}
            if hidden is not None:
                line["hidden"] = hidden
            self._file.write(json.dumps(line) + "\n")
            if self._lines.empty():
                self._file.flush()

    def close(self) -> None:
        """Write what is queued, then close the file (blocks until the writer is done)."""
        self._lines.put(None)
        self._writer.join()
        self._file.close()
