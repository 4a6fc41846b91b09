"""The simulator's configuration: one frozen dataclass, validated on creation, no I/O."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tetri.sched.chunking import PREFILL_POLICIES
from tetri.sched.decode_registry import DECODE_POLICIES
from tetri.sched.dispatch import DECODE_DISPATCH, PREFILL_DISPATCH
from tetri.sched.step_budget import STEP_BUDGET_MODES

MODES = ("colocated", "colocated-chunked", "disagg", "tetri", "auto")
DISAGG_MODES = ("disagg", "tetri")
"""Modes whose --prefill/--decode split every GPU (auto: the rest start mixed)."""
SPLIT_MODES = ("disagg", "tetri", "auto")
MODE_DEFAULTS = {
    # mode: (decode dispatch, decode policy, predictor)
    "colocated": (None, "greedy", "none"),
    "colocated-chunked": (None, "greedy", "none"),
    "disagg": ("round-robin", "greedy", "none"),
    "tetri": ("tetri", "reserve-dynamic", "oracle"),
    "auto": ("tetri", "reserve-dynamic", "oracle"),
}


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class SimConfig:
    mode: str = "tetri"
    num_gpus: int = 8
    num_prefill: int | None = None
    """Disaggregated modes: prefill workers (default gpus // 4, at least 1); the rest decode."""
    num_decode: int | None = None
    chunk_size_tokens: int = 512
    """tetri: the fixed chunk; colocated-chunked: the per-step token budget; disagg: L_m."""
    max_batched_tokens: int = 8192
    """colocated (vLLM v0.2): most prompt tokens in one prefill batch."""
    max_num_seqs: int = 256
    block_size: int = 16
    num_blocks: int | None = None
    """KV blocks per worker (default: from the hardware memory less the weights)."""
    prefill_policy: str = "fcfs"
    sched_batch: int = 16
    prefill_dispatch: str = "least-loaded"
    decode_dispatch: str | None = None
    decode_policy: str | None = None
    predictor: str | None = None
    predictor_accuracy: float = 1.0
    predictor_confusion: tuple[tuple[int, ...], ...] | None = None
    """A measured confusion matrix (rows = true bucket, columns = predicted; counts): the
    predicted bucket is drawn from the true bucket's row (replaces predictor_accuracy)."""
    bucket_tokens: int = 200
    heavy_decode_tokens: int = 128
    flip: bool = False
    flip_window_s: float = 5.0
    flip_interval_s: float = 0.1
    flip_latency_s: float = 0.007
    prefill_chunk_tokens: int | None = None
    """auto: prompt tokens per pass on a prefill-role worker (it has no decodes to keep
    within a TPOT; default 4 x chunk_size_tokens); mixed steps keep chunk_size_tokens."""
    role_busy_s: float = 0.25
    """auto: a prefill-capable worker is fully loaded (pressure 1) with this many seconds of
    queued prompt tokens (at its chunked prefill rate from the cost model)."""
    role_tpot_s: float | None = None
    """auto: the declared TPOT SLO the policy paces decode steps against (None: none)."""
    role_high: float = 0.8
    """auto: `RolePolicy` thresholds and dwell times (tetri.sched.roles)."""
    role_room: float = 0.5
    role_dwell_s: float = 1.0
    role_worker_dwell_s: float = 10.0
    seed: int = 0
    max_sim_s: float = 86400.0
    check_invariants: bool = False
    prefix_caching: bool = False
    """Prefill workers cache prompt blocks, hits from the trace's `hash_ids` (`tetri.sim.prefix`)."""
    kv_offloading_size: float = 0.0
    """GiB of host memory per worker for the prefix cache's host tier (tetri-serve's flag); 0: off."""
    swap_space: float = 0.0
    """GiB of host memory per decode worker for preempted requests' KV (tetri-serve's flag); 0: off."""
    preemption_mode: str = "auto"
    """A decode worker's preempted request: swap, recompute, or auto (the cheaper; `tetri.sim.swap`)."""
    step_budget: str | None = None
    """Mixed steps' prompt-token budget (`tetri.sched.step_budget`): "slo" (fitted to step_tpot_s)
    or "fixed" (chunk_size_tokens); default slo for auto, fixed for every other mode."""
    step_tpot_s: float | None = None
    """The declared TPOT SLO the "slo" step budget fits mixed steps to (None: fixed budget)."""

    def __post_init__(self) -> None:
        _require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _require(self.num_gpus >= 1, "need at least one GPU")
        _require(self.chunk_size_tokens >= 1 and self.max_batched_tokens >= 1, "token budgets must be >= 1")
        _require(self.max_num_seqs >= 1 and self.block_size >= 1, "max_num_seqs and block_size must be >= 1")
        _require(self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1")
        _require(self.prefill_policy in PREFILL_POLICIES, f"prefill policy must be one of {PREFILL_POLICIES}")
        _require(self.prefill_dispatch in PREFILL_DISPATCH, f"prefill dispatch must be one of {PREFILL_DISPATCH}")
        _require(self.decode_dispatch is None or self.decode_dispatch in DECODE_DISPATCH,
                 f"decode dispatch must be one of {DECODE_DISPATCH}")
        _require(self.decode_policy is None or self.decode_policy in DECODE_POLICIES,
                 f"decode policy must be one of {DECODE_POLICIES}")
        _require(self.predictor in (None, "none", "oracle"), "predictor must be none or oracle")
        _require(0.0 <= self.predictor_accuracy <= 1.0, "predictor accuracy must be in [0, 1]")
        if self.predictor_confusion is not None:
            rows = self.predictor_confusion
            _require(len(rows) >= 1 and all(len(r) == len(rows) for r in rows), "predictor confusion must be square")
            _require(all(c >= 0 for r in rows for c in r) and any(c > 0 for r in rows for c in r),
                     "predictor confusion needs non-negative counts, not all zero")
            _require(self.predictor_accuracy == 1.0, "give predictor accuracy or a confusion matrix, not both")
        _require(self.max_sim_s > 0, "max_sim_s must be > 0")
        _require(self.kv_offloading_size >= 0, "kv_offloading_size must be >= 0")
        _require(self.swap_space >= 0, "swap_space must be >= 0")
        _require(self.preemption_mode in ("auto", "swap", "recompute"), "preemption_mode must be auto, swap or recompute")
        _require(self.step_budget in (None, *STEP_BUDGET_MODES), f"step_budget must be one of {STEP_BUDGET_MODES}")
        _require(self.step_tpot_s is None or self.step_tpot_s > 0, "step_tpot_s must be > 0")
        if self.mode in DISAGG_MODES:
            _require(self.num_gpus >= 2, f"mode {self.mode} needs at least 2 GPUs (one prefill, one decode)")
            p, d = self.split()
            _require(p >= 1 and d >= 1, "need at least one prefill and one decode worker")
            _require(p + d == self.num_gpus, f"prefill ({p}) + decode ({d}) must equal gpus ({self.num_gpus})")
        elif self.mode == "auto":
            p, d = self.num_prefill or 0, self.num_decode or 0
            _require(p + d <= self.num_gpus, f"prefill ({p}) + decode ({d}) exceed gpus ({self.num_gpus})")
            _require(p + d < self.num_gpus or (p >= 1 and d >= 1),
                     "auto needs a worker able to prefill and one able to decode")
            _require(0.0 < self.role_room < self.role_high <= 1.0, "need 0 < role_room < role_high <= 1")
        else:
            _require(self.num_prefill is None and self.num_decode is None,
                     f"--prefill/--decode apply only to {SPLIT_MODES}")

    def split(self) -> tuple[int, int]:
        """(prefill workers, decode workers) of a disaggregated mode; auto: the workers that
        start as prefill and as decode (default none: every worker starts mixed)."""
        if self.mode == "auto":
            return self.num_prefill or 0, self.num_decode or 0
        if self.num_prefill is None and self.num_decode is None:
            prefill = max(1, self.num_gpus // 4)
            return prefill, self.num_gpus - prefill
        if self.num_prefill is None:
            return self.num_gpus - self.num_decode, self.num_decode
        if self.num_decode is None:
            return self.num_prefill, self.num_gpus - self.num_prefill
        return self.num_prefill, self.num_decode

    def resolved(self) -> SimConfig:
        """A copy with the per-mode defaults filled in."""
        dispatch, policy, predictor = MODE_DEFAULTS[self.mode]
        changes = {"decode_dispatch": self.decode_dispatch or dispatch,
                   "decode_policy": self.decode_policy or policy,
                   "predictor": self.predictor or predictor}
        if self.mode in SPLIT_MODES:
            changes["num_prefill"], changes["num_decode"] = self.split()
        if self.step_budget is None:  # the SLO-aware step budget is auto's default only
            changes["step_budget"] = "slo" if self.mode == "auto" else "fixed"
        if self.mode == "auto" and self.prefill_chunk_tokens is None:
            changes["prefill_chunk_tokens"] = 4 * self.chunk_size_tokens
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
