"""Instance flip (TetriInfer §3.5, papers.md §1.7): when to flip, and the drain protocol.

`FlipPolicy.decide(loads, now)` says WHEN: it returns a `FlipDecision` once one role has been
idle while the other was saturated for `window_s` seconds straight. The paper's trigger is
stated two ways ("idle for a minute", "load < 10%"); we use a load threshold held for a window:
  prefill load of a worker = min(1, queued_prefill_tokens / prefill_busy_tokens)
  decode load of a worker  = 1 if it has waiting (not yet admitted) handoffs, else
                             used blocks / total blocks
  role load                = mean over the role's ready workers
  prefill -> decode  when prefill load <= idle_threshold and decode load >= 1 - idle_threshold
  decode -> prefill  when decode load <= idle_threshold and prefill load >= 1 - idle_threshold
Only `ready` workers with role prefill/decode count (mixed workers never flip under this
policy; `tetri.sched.roles.RolePolicy` moves workers between all three roles). The donor is
the donor role's least-loaded worker (least to drain; ties -> lower id). No decision while any
worker is draining (one flip at a time; the window restarts afterwards), and never one that
leaves the donor role with fewer than `min_workers_per_role` ready workers. After a decision
the window restarts, so flips are at least `window_s` apart.

`FlipPlan` says HOW, as a pure state machine the front scheduler drives. Per worker:

    active --begin()--> draining(to_role) --poll(): nothing outstanding--> flipped
       ^                     |                                               |
       +------cancel()-------+            on_flipped(): role = to_role  <----+

Protocol, and why no request is dropped or duplicated:
  1. `begin(decision)`: the worker stops being dispatchable (`view()` shows it `draining`,
     `on_dispatch` to it raises). Refused if it would leave fewer than the minimum of active
     workers able to prefill (prefill or mixed) or able to decode (decode or mixed).
  2. Everything already sent to it runs to completion there: the front calls
     `on_dispatch(req_id, worker_id)` for every request it sends a worker and
     `on_done(req_id, worker_id)` when the worker is finished with it (prefill worker: when
     the decode side acked the KV copy and the prefill blocks are free; decode worker: when
     the request finished or was aborted). Nothing is moved or re-sent.
     (An in-place flip, below, takes the worker out only between `begin` and `poll`, which
     the front calls in one tick: from `poll` on, `view()` shows it in its new role and
     dispatch to it goes on, ordered after the SetRole.)
  3. `poll(loads)` moves a draining worker to `flipped` only when it has no outstanding
     request AND (when its load row is given) its queued prefill tokens, running and waiting
     requests all read 0; it returns the `FlipDecision`s the front must now send (the worker
     changes its role variable: no restart, no weight reload).
  4. `on_flipped(worker_id)` when the worker acks: it becomes `active` in the new role and
     dispatch to it resumes.
A request is thus owned by exactly one worker from `on_dispatch` to `on_done`, and a role
change happens only on a worker that owns none, except, with `in_place_to_mixed`, a flip
to `mixed`: it flips at the first poll, keeping what it owns (a mixed worker can run both
phases of whatever it holds); and, with `in_place_out_of_mixed`, a flip from `mixed` to
`prefill` or `decode`: it flips at the first poll too, and the worker runs its old mixed
core beside the new role's until that holds nothing (`tetri.workers.side_cores`: the old
core finishes its prompts and decodes, the new one takes only its role's new work). The
front stops routing the other phase's new work to it from the moment of `begin`. Adaptive
roles (`--mode auto`, server and simulator) set both; a flip between prefill and decode
always drains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tetri.sched.load import WorkerLoad

ACTIVE, DRAINING, FLIPPED = "active", "draining", "flipped"
FLIP_ROLES = ("prefill", "decode", "mixed")
CAN_PREFILL = ("prefill", "mixed")
CAN_DECODE = ("decode", "mixed")
IN_PLACE_TO_MIXED = frozenset({("prefill", "mixed"), ("decode", "mixed")})
IN_PLACE_OUT_OF_MIXED = frozenset({("mixed", "prefill"), ("mixed", "decode")})
"""(from role, to role) of the flips that keep the worker's work (`FlipPlan.in_place`; the
worker side runs them through `tetri.workers.side_cores`)."""


@dataclass(frozen=True)
class FlipDecision:
    worker_id: int
    from_role: str
    to_role: str
    reason: str = ""
    """Why (the adaptive role policy's words; shown in /workers, the metrics and the log)."""


class FlipError(RuntimeError):
    """An illegal transition or dispatch (a bug in the caller)."""


def prefill_load(load: WorkerLoad, prefill_busy_tokens: int) -> float:
    return min(1.0, load.queued_prefill_tokens / prefill_busy_tokens)


def decode_load(load: WorkerLoad) -> float:
    if load.waiting_reqs > 0:
        return 1.0
    if load.total_blocks <= 0:
        return 0.0
    return (load.total_blocks - load.free_blocks) / load.total_blocks


class FlipPolicy:
    """When to flip a worker; see the module docstring for the rule."""

    def __init__(self, idle_threshold: float = 0.1, window_s: float = 5.0,
                 min_workers_per_role: int = 1, prefill_busy_tokens: int = 2048) -> None:
        if not 0.0 <= idle_threshold < 0.5:
            raise ValueError("idle_threshold must be in [0, 0.5)")
        if window_s < 0 or min_workers_per_role < 1 or prefill_busy_tokens < 1:
            raise ValueError("need window_s >= 0, min_workers_per_role >= 1, prefill_busy_tokens >= 1")
        self.idle_threshold = idle_threshold
        self.window_s = window_s
        self.min_workers_per_role = min_workers_per_role
        self.prefill_busy_tokens = prefill_busy_tokens
        self._since_s: dict[str, float] = {}

    def _direction(self, prefill: list[WorkerLoad], decode: list[WorkerLoad]) -> str | None:
        if not prefill or not decode:
            return None
        p = sum(prefill_load(w, self.prefill_busy_tokens) for w in prefill) / len(prefill)
        d = sum(decode_load(w) for w in decode) / len(decode)
        low, high = self.idle_threshold, 1.0 - self.idle_threshold
        if p <= low and d >= high and len(prefill) > self.min_workers_per_role:
            return "prefill"
        if d <= low and p >= high and len(decode) > self.min_workers_per_role:
            return "decode"
        return None

    def decide(self, loads: list[WorkerLoad], now: float) -> FlipDecision | None:
        if any(w.state == "draining" for w in loads):
            self._since_s.clear()
            return None
        ready = [w for w in loads if w.state == "ready"]
        prefill = [w for w in ready if w.role == "prefill"]
        decode = [w for w in ready if w.role == "decode"]
        donor_role = self._direction(prefill, decode)
        if donor_role is None:
            self._since_s.clear()
            return None
        for other in FLIP_ROLES:
            if other != donor_role:
                self._since_s.pop(other, None)
        since = self._since_s.setdefault(donor_role, now)
        if now - since < self.window_s:
            return None
        self._since_s[donor_role] = now
        if donor_role == "prefill":
            donor = min(prefill, key=lambda w: (w.queued_prefill_tokens, w.running_reqs + w.waiting_reqs, w.worker_id))
            return FlipDecision(donor.worker_id, "prefill", "decode")
        donor = min(decode, key=lambda w: (w.running_reqs + w.waiting_reqs,
                                            w.total_blocks - w.free_blocks, w.worker_id))
        return FlipDecision(donor.worker_id, "decode", "prefill")


@dataclass
class WorkerFlipState:
    role: str
    state: str = ACTIVE
    to_role: str | None = None
    outstanding: set[str] = field(default_factory=set)


class FlipPlan:
    """The drain -> flip -> resume state machine; protocol in the module docstring."""

    def __init__(self, roles: dict[int, str] | None = None, min_workers_per_role: int = 1,
                 in_place_to_mixed: bool = False, in_place_out_of_mixed: bool = False) -> None:
        """`in_place_to_mixed`: a flip TO `mixed` needs no drain (a mixed worker runs both
        phases, so it can finish whatever it holds); `in_place_out_of_mixed`: nor a flip FROM
        `mixed` (its old mixed core finishes what it holds beside the new role's core);
        otherwise every flip drains."""
        self.min_workers_per_role = min_workers_per_role
        self.in_place_to_mixed = in_place_to_mixed
        self.in_place_out_of_mixed = in_place_out_of_mixed
        self._workers: dict[int, WorkerFlipState] = {}
        for worker_id, role in (roles or {}).items():
            self.add_worker(worker_id, role)

    def add_worker(self, worker_id: int, role: str) -> None:
        if worker_id in self._workers:
            raise FlipError(f"worker {worker_id} already known")
        self._workers[worker_id] = WorkerFlipState(role)

    def remove_worker(self, worker_id: int) -> set[str]:
        """Forget a dead worker; returns the requests it still owned (the caller fails or
        retries them)."""
        state = self._workers.pop(worker_id, None)
        return set() if state is None else set(state.outstanding)

    def role_of(self, worker_id: int) -> str:
        return self._workers[worker_id].role

    def state_of(self, worker_id: int) -> str:
        return self._workers[worker_id].state

    def outstanding(self, worker_id: int) -> frozenset[str]:
        return frozenset(self._workers[worker_id].outstanding)

    def _serving_role(self, state: WorkerFlipState) -> str | None:
        """The role dispatch sends a worker work for: its role while active; its new role once
        an in-place flip was ordered (the SetRole goes out before anything sent after it, so
        the worker takes that work in its new role); None while it drains or awaits its ack."""
        if state.state == ACTIVE:
            return state.role
        if state.state == FLIPPED and state.to_role and self.in_place(state.role, state.to_role):
            return state.to_role
        return None

    def can_dispatch(self, worker_id: int) -> bool:
        state = self._workers.get(worker_id)
        return state is not None and self._serving_role(state) is not None

    def active_workers(self, role: str) -> list[int]:
        return sorted(w for w, s in self._workers.items() if s.state == ACTIVE and s.role == role)

    def active_able(self, roles: tuple[str, ...]) -> list[int]:
        """Workers dispatch may send work to whose role is one of `roles` (e.g. CAN_PREFILL)."""
        return sorted(w for w, s in self._workers.items() if self._serving_role(s) in roles)

    def would_starve(self, worker_id: int, from_role: str, to_role: str | None = None) -> bool:
        """True when taking `worker_id` out of dispatch leaves fewer than the minimum of
        active workers able to prefill, or able to decode, among those its role counts for
        (an in-place flip to `to_role` takes away only what `to_role` cannot do)."""
        keeps = to_role if to_role is not None and self.in_place(from_role, to_role) else None
        for able in (CAN_PREFILL, CAN_DECODE):
            if from_role in able and keeps not in able and len([w for w in self.active_able(able)
                                                               if w != worker_id]) < self.min_workers_per_role:
                return True
        return False

    def view(self, loads: list[WorkerLoad]) -> list[WorkerLoad]:
        """Load rows as the plan sees them: role from the plan, and `draining` state for a
        known worker that is not active, so dispatchers skip it and `FlipPolicy` waits."""
        out = []
        for load in loads:
            state = self._workers.get(load.worker_id)
            if state is None:
                out.append(load)
                continue
            serving = self._serving_role(state)
            row_state = load.state if serving is not None or not load.alive else "draining"
            role = serving or state.role
            if row_state == load.state and role == load.role:
                out.append(load)  # as published (the common case: no copy)
            else:
                out.append(dataclasses.replace(load, role=role, state=row_state))
        return out

    def on_dispatch(self, req_id: str, worker_id: int) -> None:
        if not self.can_dispatch(worker_id):
            raise FlipError(f"worker {worker_id} is not accepting dispatch")
        outstanding = self._workers[worker_id].outstanding
        if req_id in outstanding:
            raise FlipError(f"request {req_id} already sent to worker {worker_id}")
        outstanding.add(req_id)

    def on_done(self, req_id: str, worker_id: int) -> bool:
        """The worker no longer holds the request; False if it was not outstanding there."""
        state = self._workers.get(worker_id)
        if state is None or req_id not in state.outstanding:
            return False
        state.outstanding.discard(req_id)
        return True

    def in_place(self, from_role: str, to_role: str) -> bool:
        """Whether a flip from `from_role` to `to_role` keeps the worker's work (no drain)."""
        flip = (from_role, to_role)
        return (self.in_place_to_mixed and flip in IN_PLACE_TO_MIXED) or \
            (self.in_place_out_of_mixed and flip in IN_PLACE_OUT_OF_MIXED)

    def begin(self, decision: FlipDecision) -> bool:
        """Start draining; False (nothing changes) if illegal or it would starve a role."""
        state = self._workers.get(decision.worker_id)
        if state is None or state.state != ACTIVE or state.role != decision.from_role:
            return False
        if decision.to_role == decision.from_role or decision.to_role not in FLIP_ROLES:
            return False
        if self.would_starve(decision.worker_id, decision.from_role, decision.to_role):
            return False
        state.state, state.to_role = DRAINING, decision.to_role
        return True

    def cancel(self, worker_id: int) -> bool:
        """Abort a drain that has not flipped yet; the worker accepts dispatch again."""
        state = self._workers.get(worker_id)
        if state is None or state.state != DRAINING:
            return False
        state.state, state.to_role = ACTIVE, None
        return True

    def poll(self, loads: list[WorkerLoad] | None = None) -> list[FlipDecision]:
        """Draining workers that are empty become `flipped`; returns the role changes to send."""
        rows = {w.worker_id: w for w in loads or ()}
        orders = []
        for worker_id, state in sorted(self._workers.items()):
            if state.state != DRAINING:
                continue
            in_place = self.in_place(state.role, state.to_role)
            if state.outstanding and not in_place:
                continue
            row = rows.get(worker_id)
            if not in_place and row is not None and (row.queued_prefill_tokens or row.running_reqs
                                                     or row.waiting_reqs):
                continue
            state.state = FLIPPED
            orders.append(FlipDecision(worker_id, state.role, state.to_role or state.role))
        return orders

    def on_flipped(self, worker_id: int) -> bool:
        """The worker acked its new role: active again, dispatch resumes."""
        state = self._workers.get(worker_id)
        if state is None or state.state != FLIPPED or state.to_role is None:
            return False
        state.role, state.state, state.to_role = state.to_role, ACTIVE, None
        return True
