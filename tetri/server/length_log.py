"""`--log-lengths DIR`: record (features, actual output length) of served requests so the
length predictor can be retrained from real traffic.

One JSONL line per finished choice, in `DIR/lengths-<pid>.jsonl`, in the format
`tetri-predictor train` reads: `prompt` (text), `output_tokens`, plus `finish_reason`
("stop" lines are natural lengths; "length" lines were cut by max_tokens), `prompt_tokens`
and, when the prefill workers report it, `hidden` (the probe's features).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Entry:
    prompt: str | None
    prompt_tokens: int
    hidden: list[float] | None = None
    counts: dict[int, int] = field(default_factory=dict)


class LengthLog:
    def __init__(self, out_dir: str) -> None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"lengths-{os.getpid()}.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._live: dict[str, _Entry] = {}

    def start(self, req_id: str, prompt: str | None, prompt_tokens: int) -> None:
        self._live[req_id] = _Entry(prompt, prompt_tokens)

    def on_prefilled(self, req_id: str, hidden, first_tokens: list[int], finish_reasons: list[str | None]) -> None:
        entry = self._live.get(req_id)
        if entry is None:
            return
        entry.hidden = hidden
        for choice in range(len(first_tokens)):
            self.on_token(req_id, choice, finish_reasons[choice] if finish_reasons else None)

    def on_token(self, req_id: str, choice: int, finish_reason: str | None) -> None:
        entry = self._live.get(req_id)
        if entry is None:
            return
        entry.counts[choice] = entry.counts.get(choice, 0) + 1
        if finish_reason is not None:
            line = {"prompt": entry.prompt, "output_tokens": entry.counts[choice], "finish_reason": finish_reason,
                    "prompt_tokens": entry.prompt_tokens}
            if entry.hidden is not None:
                line["hidden"] = entry.hidden
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def forget(self, req_id: str) -> None:
        self._live.pop(req_id, None)

    def close(self) -> None:
        self._file.close()
