"""Per-request measurements and SLOs: the plain data shared by tetri-bench and tetri-sim.

No HTTP, no plotting: importing this module only pulls in msgspec.
"""

from __future__ import annotations

import math

import msgspec


class RequestRecord(msgspec.Struct, kw_only=True):
    """What one request did. Times in seconds; `arrival_s` is from the start of the run.

    For a failed request (`ok=False`) the latencies are None/empty and `error` says why;
    `output_tokens` is what arrived before the failure (usually 0).
    """

    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None  # send -> first token
    itl_s: list[float] = []  # gaps between successive streamed token chunks
    e2e_s: float | None = None  # send -> last byte
    ok: bool = True
    error: str | None = None
    arrival_s: float = 0.0  # when it was sent, from the start of the run
    resent: bool = False  # re-sent on a new connection: the pooled one was closed by the server

    @property
    def tpot_s(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1); None unless ok with more than one token."""
        if not self.ok or self.output_tokens <= 1 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class Slo(msgspec.Struct, frozen=True):
    """Latency SLO. A request meets it when ttft <= ttft_s AND tpot <= tpot_s (DistServe).

    A request with one output token has no TPOT and is judged on TTFT alone.
    """

    ttft_s: float = math.inf
    tpot_s: float = math.inf

    @classmethod
    def parse(cls, text: str) -> Slo:
        """'ttft=0.5,tpot=0.05' (seconds; either part may be omitted)."""
        values: dict[str, float] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip().lower().removesuffix("_s")
            if not sep or key not in ("ttft", "tpot"):
                raise ValueError(f"bad SLO part {part!r}; expected ttft=SECONDS,tpot=SECONDS")
            seconds = float(value)
            if not seconds > 0:
                raise ValueError(f"SLO {key} must be > 0 seconds (got {value!r})")
            values[f"{key}_s"] = seconds
        if not values:
            raise ValueError("empty SLO; expected ttft=SECONDS,tpot=SECONDS")
        return cls(**values)

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok or record.ttft_s is None or record.ttft_s > self.ttft_s:
            return False
        tpot = record.tpot_s
        return tpot is None or tpot <= self.tpot_s

    def to_dict(self) -> dict[str, float | None]:
        return {"ttft_s": None if math.isinf(self.ttft_s) else self.ttft_s,
                "tpot_s": None if math.isinf(self.tpot_s) else self.tpot_s}
