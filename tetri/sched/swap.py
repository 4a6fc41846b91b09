"""Swap or recompute a preempted job's KV (FastServe's proactive KV swap, issue 19 item 5).

Pure policy: the caller measures the costs and passes them in (no clock here).

    swap cost      = 2 * blocks * copy_s_per_block      (offload now, upload before it resumes)
    recompute cost = tokens * prefill_s_per_token       (re-prefill prompt + outputs)

`choose_preemption` picks the cheaper; a cost not measured yet (None) is learned first: swap
when the copy cost is unknown (one swap measures it), else recompute when the prefill cost is
unknown and no recompute is already pending (`prefill_pending`: its re-prefill will measure
it; meanwhile swap). `mode` "swap" or "recompute" forces one; swap always needs the host room
(`host_fits`), else the job is recomputed. `CostMeter` keeps the measured per-unit costs as
exponentially weighted means of what the caller timed.
"""

from __future__ import annotations

PREEMPTION_MODES = ("auto", "swap", "recompute")


def swap_cost_s(num_blocks: int, copy_s_per_block: float) -> float:
    return 2.0 * num_blocks * copy_s_per_block


def recompute_cost_s(num_tokens: int, prefill_s_per_token: float) -> float:
    return num_tokens * prefill_s_per_token


def choose_preemption(num_blocks: int, num_tokens: int, copy_s_per_block: float | None,
                      prefill_s_per_token: float | None, host_fits: bool, mode: str = "auto",
                      prefill_pending: bool = False) -> str:
    """"swap" or "recompute" for one preempted job; see the module docstring."""
    if mode not in PREEMPTION_MODES:
        raise ValueError(f"unknown preemption mode {mode!r}; expected one of {PREEMPTION_MODES}")
    if not host_fits or mode == "recompute":
        return "recompute"
    if mode == "swap" or copy_s_per_block is None:
        return "swap"
    if prefill_s_per_token is None:
        return "swap" if prefill_pending else "recompute"
    swap_s = swap_cost_s(num_blocks, copy_s_per_block)
    return "swap" if swap_s < recompute_cost_s(num_tokens, prefill_s_per_token) else "recompute"


class CostMeter:
    """Measured per-block copy and per-token prefill seconds (EWMA, `weight` for the newest)."""

    def __init__(self, weight: float = 0.3) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError("weight must be in (0, 1]")
        self.weight = weight
        self.copy_s_per_block: float | None = None
        self.prefill_s_per_token: float | None = None

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1.0 - self.weight) * old + self.weight * new

    def add_copy(self, num_blocks: int, seconds: float) -> None:
        if num_blocks > 0:
            self.copy_s_per_block = self._mix(self.copy_s_per_block, seconds / num_blocks)

    def add_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0:
            self.prefill_s_per_token = self._mix(self.prefill_s_per_token, seconds / num_tokens)

    def choose(self, num_blocks: int, num_tokens: int, host_fits: bool, mode: str = "auto",
               prefill_pending: bool = False) -> str:
        return choose_preemption(num_blocks, num_tokens, self.copy_s_per_block, self.prefill_s_per_token,
                                 host_fits, mode, prefill_pending)
