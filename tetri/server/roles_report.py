"""What the role policy decided, for people: `/workers`, `/metrics` and the log.

The front scheduler appends every flip it begins to `FrontScheduler.role_decisions`
(`(monotonic now, FlipDecision)`; one per flip, so it stays short); the supervisor tick
hands the ones it has not seen yet to `RolesReport.take` (a read: the scheduler's state
changes only through its event methods),
which logs one INFO line per decision with its reason, counts it in
`tetri:role_changes_total{from_role,to_role,reason}` and keeps the recent ones for
`/workers` (the reason label is the decision's kind, e.g. `prefill_starved`; the full text,
with the pressures, is in the log and in `/workers`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque

log = logging.getLogger("tetri.roles")
KEEP_DECISIONS = 20
_KIND = re.compile(r"^(prefill|decode|both) starved|^(prefill) interference|^(split) after")


def phases(roles: set[str]) -> set[str]:
    """The phases workers of these roles can run (a mixed worker: both)."""
    return {phase for phase in ("prefill", "decode") if roles & {phase, "mixed"}}


def reason_kind(reason: str) -> str:
    """A bounded label for a decision's reason: `<side>_starved`, `prefill_interference`,
    `split` (the light-load move toward prefill + decode), or `flip` (the instance-flip
    policy, which states no reason)."""
    match = _KIND.match(reason or "")
    if match is None:
        return "flip"
    if match.group(3):
        return "split"
    return f"{match.group(1)}_starved" if match.group(1) else "prefill_interference"


class RolesReport:
    def __init__(self, mode: str, start: dict | None = None) -> None:
        """`mode`: the deployment mode (auto, disagg, ...); `start`: how the initial roles were
        chosen (tetri-plan's pick), shown in /workers."""
        self.mode = mode
        self.start = start
        self.decisions_total = 0
        self.recent: deque[dict] = deque(maxlen=KEEP_DECISIONS)
        self._seen = 0

    def take(self, scheduler, metrics=None) -> None:
        """Report the decisions the scheduler made since the last call."""
        new = scheduler.role_decisions[self._seen:]
        if not new:
            return
        self._seen += len(new)
        mono_now, wall_now = time.monotonic(), time.time()
        for at_s, decision in new:
            kind = reason_kind(decision.reason)
            row = dict(worker_id=decision.worker_id, from_role=decision.from_role, to_role=decision.to_role,
                       reason=decision.reason or "instance flip (FlipPolicy)", reason_kind=kind,
                       time_unix_s=round(wall_now - (mono_now - at_s), 3))
            self.recent.append(row)
            self.decisions_total += 1
            log.info("role change: worker %d %s -> %s (%s)", decision.worker_id, decision.from_role,
                     decision.to_role, row["reason"])
            if metrics is not None:
                metrics.observe_role_change(decision.from_role, decision.to_role, kind)

    def view(self) -> dict:
        return dict(mode=self.mode, start=self.start, decisions_total=self.decisions_total,
                    last_decision=self.recent[-1] if self.recent else None, recent_decisions=list(self.recent))

    @staticmethod
    def flip_state(scheduler, worker_id: int) -> str | None:
        """active | draining | flipped (SetRole sent, not acked) for a worker the flip plan knows."""
        plan = scheduler.flip_plan
        if plan is None or worker_id not in plan._workers:
            return None
        return plan.state_of(worker_id)
