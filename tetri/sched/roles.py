"""Adaptive roles (issue 19 item 3): move workers between prefill, mixed and decode with the load.

Pure policy: `RolePolicy.decide(loads, now)` reads the load board's rows (as `FlipPlan.view`
shows them) and returns a `FlipDecision` with a `reason`, or None; the caller drives the
flip through `FlipPlan` as for any instance flip. Roles lie on a line,

    prefill  --  mixed  --  decode

and one decision moves one worker one step along it: toward `prefill` when prefill is the
bottleneck, toward `decode` when decode is. A `mixed` worker (chunked prefill, Sarathi-style)
takes prompts from level-1 dispatch, keeps the requests it prefilled and decodes them itself,
and also takes handoffs from prefill workers.

Signals, over `ready` workers (a draining worker stops every decision: one flip at a time):
  prefill pressure P = mean over prefill-capable workers (prefill, mixed) of
                       min(1, queued_prefill_tokens / prefill_busy_tokens)
  decode pressure  D = mean over decode-capable workers (decode, mixed) of the most of
                       (running + waiting) / max_num_seqs, used / total blocks and, with a
                       declared TPOT SLO `tpot_s`, step_s / tpot_s (its pace), capped at 1
Hysteresis: a side is *starved* when its pressure is >= `high`, and *has room* when its
pressure is < `room`; `room` < `high`, so a load oscillating between them changes nothing.
  P starved and D has room, held for `dwell_s`:  decode -> mixed (the least-loaded decode
      worker) if there is one, else mixed -> prefill (the mixed worker holding fewest
      requests: least to drain);
  D starved and P has room, held for `dwell_s`:  prefill -> mixed (the prefill worker with
      the shortest queue) if there is one, else mixed -> decode (the shortest prefill queue);
  both starved, held for `in_place_dwell_s`:  prefill -> mixed, else decode -> mixed (each
      keeps its work and takes the other phase's as well; a drain would take capacity
      away from both).
Flips to and from mixed are in place (the front runs this policy with `FlipPlan(in_place_to_mixed=True,
in_place_out_of_mixed=True)`; `tetri.workers.side_cores`): the worker keeps what it holds and
its old core finishes it, while dispatch sends it only its new role's work. A move out of mixed
is still refused when the side losing the worker would be left at a pressure >= `room` over its
remaining workers (pressure x n / (n - 1)), and needs `dwell_s` of hold; a move to mixed only
`in_place_dwell_s` (default dwell_s / 2). A worker that flipped is not moved again for
`worker_dwell_s`; after a decision the hold restarts. Never a decision that would leave no ready
worker able to prefill or to decode (`FlipPlan.begin` checks the same; an in-place flip keeps
what its new role does). With `mixed_hands_off=False` (tetri-serve and the simulator: mixed
workers keep every request they prefill), never a decision that leaves a decode worker with no
prefill worker to feed it (it would sit idle while the others work). Where that refuses every
move of a decode-starved load (1 prefill + 1 decode: the prefill worker may not go mixed while
it alone feeds the decode worker), the decode worker goes mixed first (in place; the prefill
worker keeps feeding it), and a later hold moves the prefill worker: back to all-mixed.

The split (light load, issue 19: on the CPU disaggregation beat colocated on TPOT p99 and JCT
below capacity, and auto, started all-mixed by tetri-plan, never left it). With no side starved:
when every side has room now (prefill pressure and decode *occupancy*, the fuller of slots and
blocks, < `room`; decode pressure with its pace < `high`), the side losing the worker would still
have room after the move (its pressure x n / (n - 1) < `room`), and prompts are actually being
interleaved with decodes on the mixed workers (a mixed row with queued prompt tokens while it
runs decodes, or its `interleaved_steps` counter grew within `worker_dwell_s`), and the prefill
side's busy fraction over the last `dwell_s` (the growth of `prefill_busy_s`, seconds of steps
that ran prompt tokens, per second; x n / (n - 1) when it loses the worker) stays below `room` (queue
lengths alone cannot tell a chunked mixed worker that prefills as fast as prompts come from one
that has no capacity to spare: in the simulator, 8 x H200 at 140 req/s, the split without
it cost 14% goodput), held for
`in_place_dwell_s` (the flip drains nothing): one mixed worker one step out of mixed, toward a
role no worker has yet: mixed -> prefill (fewest requests) while there is no prefill worker,
then mixed -> decode (the shortest prompt queue) while there is no decode worker. Two mixed
workers thus become prefill + mixed, then prefill + decode; more keep the rest mixed (one
prefill and one decode worker beside them: a further split is a capacity bet light-load
pressures cannot judge; in the simulator, 8 x H200 at 140 req/s, splitting all of them lost
up to 23% goodput before the busy-fraction check). Its reverse is the line's
move toward mixed when a side is starved (pressure >= `high`); the split's condition (every
pressure after it < `room` < `high`) lies strictly inside that one's complement, so a steady load
cannot flip back and forth (between `room` and `high` neither fires).

Decode starved by *pace alone* on the mixed workers (their mean step_s / tpot_s >= `high` while
their slots and blocks are below `room`, with prompt tokens queued on them) is prefill
interference: their prompt chunks slow every decode step, and more mixed workers would add to
it. So instead of the line's moves: with a prefill worker, mixed -> decode (the shortest prompt
queue); without one (all-mixed, where a decode worker would go unfed), mixed -> prefill (the
fewest requests), which takes the prompts off the others, so that a later hold can make one of
them a decode worker. All-mixed thus reaches prefill + decode (+ mixed), with two workers too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tetri.sched.dispatch import load_share, slot_cap
from tetri.sched.flip import CAN_DECODE, CAN_PREFILL, FlipDecision
from tetri.sched.load import WorkerLoad

KEEP_SLACK = 0.125
"""A mixed worker hands a request it prefilled to another worker only when that one is
emptier by more than this share of a worker (32 of 256 slots)."""

TOWARD_PREFILL = {"decode": "mixed", "mixed": "prefill"}
TOWARD_DECODE = {"prefill": "mixed", "mixed": "decode"}


def keeps_its_decode(own: WorkerLoad, target: WorkerLoad, slack: float = KEEP_SLACK) -> bool:
    """A mixed worker decodes what it prefilled (no KV copy) unless `target`, level-2
    dispatch's pick over the decode-capable workers, is less loaded by more than `slack`
    (load share: the fuller of slots and KV blocks, as TetriDecode reads it)."""
    if target.worker_id == own.worker_id:
        return True
    return float(load_share(own, slot_cap(own))) <= float(load_share(target, slot_cap(target))) + slack


def prefill_pressure(load: WorkerLoad, busy_tokens: int) -> float:
    return min(1.0, load.queued_prefill_tokens / busy_tokens)


def decode_occupancy(load: WorkerLoad, default_seqs: int = 256) -> float:
    """The fuller of slots ((running + waiting) / max_num_seqs) and KV blocks."""
    slots = load.max_num_seqs or default_seqs
    seqs = (load.running_reqs + load.waiting_reqs) / slots
    blocks = (load.total_blocks - load.free_blocks) / load.total_blocks if load.total_blocks > 0 else 0.0
    return max(seqs, blocks)


def decode_pace(load: WorkerLoad, tpot_s: float | None) -> float:
    """step_s / tpot_s while the worker decodes (0 without a declared TPOT or decodes)."""
    return load.step_s / tpot_s if tpot_s and load.running_reqs else 0.0


def decode_pressure(load: WorkerLoad, tpot_s: float | None = None, default_seqs: int = 256) -> float:
    return min(1.0, max(decode_occupancy(load, default_seqs), decode_pace(load, tpot_s)))


@dataclass(frozen=True)
class Pressures:
    prefill: float
    decode: float


def pressures(ready: list[WorkerLoad], busy_tokens: int, tpot_s: float | None = None) -> Pressures | None:
    p_rows = [w for w in ready if w.role in CAN_PREFILL]
    d_rows = [w for w in ready if w.role in CAN_DECODE]
    if not p_rows or not d_rows:
        return None
    return Pressures(sum(prefill_pressure(w, busy_tokens) for w in p_rows) / len(p_rows),
                     sum(decode_pressure(w, tpot_s) for w in d_rows) / len(d_rows))


class RolePolicy:
    """When to move which worker to which role; the rule is in the module docstring."""

    def __init__(self, prefill_busy_tokens: int = 2048, high: float = 0.8, room: float = 0.5,
                 dwell_s: float = 1.0, worker_dwell_s: float = 10.0, tpot_s: float | None = None,
                 in_place_dwell_s: float | None = None, mixed_hands_off: bool = True) -> None:
        """`in_place_dwell_s` (default dwell_s / 2): the hold before a move TO mixed, which
        drains nothing; a move out of mixed (a drain) needs `dwell_s`."""
        if not 0.0 < room < high <= 1.0:
            raise ValueError("need 0 < room < high <= 1")
        if prefill_busy_tokens < 1 or dwell_s < 0 or worker_dwell_s < 0:
            raise ValueError("need prefill_busy_tokens >= 1, dwell_s >= 0, worker_dwell_s >= 0")
        self.prefill_busy_tokens = prefill_busy_tokens
        self.high = high
        self.room = room
        self.dwell_s = dwell_s
        self.worker_dwell_s = worker_dwell_s
        self.tpot_s = tpot_s
        self.in_place_dwell_s = dwell_s / 2 if in_place_dwell_s is None else min(in_place_dwell_s, dwell_s)
        self.mixed_hands_off = mixed_hands_off
        self._since: tuple[str, float] | None = None
        """(the starved side, since when) while one side has been starved continuously."""
        self._last_flip_s: dict[int, float] = {}
        self._split_since: tuple[float, frozenset[int]] | None = None
        """While the split's room holds: (since when, the mixed workers then)."""
        self._interleaved_s: float | None = None
        """When prompts were last seen interleaved with decodes on a mixed worker."""
        self._steps_seen: dict[int, int] = {}
        """Each worker's `interleaved_steps` at the last decision call."""
        self._busy_marks: deque[tuple[float, dict[int, float]]] = deque()
        """(when, every worker's prefill_busy_s) at each call, over the last `dwell_s` or so."""

    def starved_side(self, p: Pressures) -> str | None:
        if p.prefill >= self.high and p.decode >= self.high:
            return "both"
        if p.prefill >= self.high and p.decode < self.room:
            return "prefill"
        if p.decode >= self.high and p.prefill < self.room:
            return "decode"
        return None

    def _settled(self, load: WorkerLoad, now: float) -> bool:
        last = self._last_flip_s.get(load.worker_id)
        return last is None or now - last >= self.worker_dwell_s

    def _leaves_room(self, ready: list[WorkerLoad], worker: WorkerLoad, to_role: str, p: Pressures) -> bool:
        """A move out of mixed takes a capability away: the other side's pressure, spread over
        the workers left with it, must stay below `room` (else the move would starve it)."""
        if worker.role != "mixed":
            return True
        able, pressure = (CAN_DECODE, p.decode) if to_role == "prefill" else (CAN_PREFILL, p.prefill)
        count = sum(1 for w in ready if w.role in able)
        return count > 1 and pressure * count / (count - 1) < self.room

    def _pick(self, ready: list[WorkerLoad], side: str, now: float) -> WorkerLoad | None:
        steps = TOWARD_PREFILL if side == "prefill" else TOWARD_DECODE
        # the role that gives up nothing first (decode -> mixed keeps decoding; prefill -> mixed keeps
        # prefilling); both starved: only those (a prefill worker takes decodes too, then a decode
        # worker takes prompts too), never a drain
        order = {"prefill": ("decode", "mixed"), "decode": ("prefill", "mixed"), "both": ("prefill", "decode")}[side]
        for role in order:
            cands = [w for w in ready if w.role == role and self._settled(w, now)
                     and not self._starves(ready, w, self._to_role(side, w))
                     and self._feeds_decode(ready, w, self._to_role(side, w))]
            if not cands:
                continue
            if role == "mixed":  # it will drain: least to drain
                key = (lambda w: (w.running_reqs + w.waiting_reqs, w.queued_prefill_tokens, w.worker_id)) \
                    if steps["mixed"] == "prefill" else (lambda w: (w.queued_prefill_tokens, w.worker_id))
            elif role == "decode":
                key = lambda w: (decode_pressure(w), w.worker_id)  # noqa: E731
            else:
                key = lambda w: (w.queued_prefill_tokens, w.worker_id)  # noqa: E731
            return min(cands, key=key)
        return None

    @staticmethod
    def _to_role(side: str, worker: WorkerLoad) -> str:
        return "mixed" if side == "both" else (TOWARD_PREFILL if side == "prefill" else TOWARD_DECODE)[worker.role]

    def _feeds_decode(self, ready: list[WorkerLoad], worker: WorkerLoad, to_role: str) -> bool:
        """Without mixed workers handing off, a decode worker is fed only by prefill workers:
        after the move, decode workers need a prefill worker."""
        if self.mixed_hands_off:
            return True
        after = [to_role if w.worker_id == worker.worker_id else w.role for w in ready]
        return "decode" not in after or "prefill" in after

    @staticmethod
    def _starves(ready: list[WorkerLoad], worker: WorkerLoad, to_role: str | None = None) -> bool:
        """Moving `worker` to `to_role` would leave no ready worker able to prefill or decode. A
        flip to or from mixed is in place (`FlipPlan(in_place_...)`, as the front runs it with
        this policy): the worker keeps doing what `to_role` does; None: counted as a drain."""
        others = [w for w in ready if w.worker_id != worker.worker_id]
        return any(worker.role in able and to_role not in able and not any(w.role in able for w in others)
                   for able in (CAN_PREFILL, CAN_DECODE))

    def decide(self, loads: list[WorkerLoad], now: float) -> FlipDecision | None:
        self._watch_interleaving(loads, now)
        if any(w.state == "draining" for w in loads):
            self._since = self._split_since = None
            return None
        ready = [w for w in loads if w.state == "ready" and w.role in ("prefill", "decode", "mixed")]
        p = pressures(ready, self.prefill_busy_tokens, self.tpot_s)
        side = None if p is None else self.starved_side(p)
        if side is None:
            self._since = None
            return None if p is None else self._split(ready, p, now)
        self._split_since = None
        if self._since is None or self._since[0] != side:
            self._since = (side, now)
        held_s = now - self._since[1]
        if held_s < self.in_place_dwell_s:
            return None
        if side == "decode" and self._interference(ready):
            return self._unmix(ready, p, now, held_s)
        worker = self._pick(ready, side, now)
        if worker is None and side == "decode" and not self.mixed_hands_off:
            return self._remix(ready, p, now, held_s)
        if worker is None or (worker.role == "mixed" and held_s < self.dwell_s):
            return None
        to_role = self._to_role(side, worker)
        if not self._leaves_room(ready, worker, to_role, p):
            return None
        self._since = None
        self._last_flip_s[worker.worker_id] = now
        return FlipDecision(worker.worker_id, worker.role, to_role, self._reason(side, p, worker, to_role, held_s))

    def _remix(self, ready: list[WorkerLoad], p: Pressures, now: float, held_s: float) -> FlipDecision | None:
        """Decode starved where the line's moves are refused: a prefill worker may not go mixed
        while it is the only one feeding a decode worker (mixed workers keep what they prefill),
        so e.g. 1 prefill + 1 decode could never return to all-mixed. The way back is the
        decode worker -> mixed first (in place: it keeps decoding and the prefill worker keeps
        feeding it; it takes prompts too), after which the prefill worker may go mixed."""
        cands = [w for w in ready if w.role == "decode" and self._settled(w, now)
                 and any(o.role == "prefill" for o in ready)]
        if not cands:
            return None
        worker = min(cands, key=lambda w: (decode_pressure(w), w.worker_id))
        self._since = None
        self._last_flip_s[worker.worker_id] = now
        return FlipDecision(worker.worker_id, "decode", "mixed",
                            f"decode starved for {held_s:.1f} s: decode pressure {p.decode:.2f} >= {self.high:g} "
                            f"while prefill pressure {p.prefill:.2f} < {self.room:g}; worker {worker.worker_id} "
                            f"decode -> mixed (no prefill worker may go mixed while it alone feeds a decode "
                            f"worker: this one goes first)")

    def _interference(self, ready: list[WorkerLoad]) -> bool:
        """Decode starved by pace alone on mixed workers that keep what they prefill (see the
        module docstring): their mean pace >= `high` while their occupancy < `room`, and
        prompt tokens queued on them (without any, the slow steps are the decodes' own)."""
        mixed = [w for w in ready if w.role == "mixed"]
        if self.mixed_hands_off or not mixed:
            return False
        pace = sum(min(1.0, decode_pace(w, self.tpot_s)) for w in mixed) / len(mixed)
        occupancy = sum(decode_occupancy(w) for w in mixed) / len(mixed)
        prompts = any(w.queued_prefill_tokens for w in mixed)  # else the slow steps are decodes' own
        return prompts and pace >= self.high and occupancy < self.room

    def _unmix(self, ready: list[WorkerLoad], p: Pressures, now: float, held_s: float) -> FlipDecision | None:
        """Prefill interference: take prompts off the mixed workers instead of adding more
        mixed ones. With a prefill worker to feed it: mixed -> decode (shortest prompt queue);
        without one: mixed -> prefill (fewest requests: least to drain) so that a decode
        worker can follow. Both flip in place (the old mixed core finishes what it holds) and
        need `dwell_s`."""
        to_role = "decode" if any(w.role == "prefill" for w in ready) else "prefill"
        cands = [w for w in ready if w.role == "mixed" and self._settled(w, now)
                 and not self._starves(ready, w, to_role)]
        if held_s < self.dwell_s or not cands:
            return None
        if to_role == "decode":
            worker, to_role = min(cands, key=lambda w: (w.queued_prefill_tokens, w.worker_id)), "decode"
            if not self._leaves_room(ready, worker, to_role, p):
                return None
        elif sum(1 for w in ready if w.role == "mixed") >= 2:  # in place: the last mixed one needs no drain
            worker = min(cands, key=lambda w: (w.running_reqs + w.waiting_reqs, w.queued_prefill_tokens, w.worker_id))
            to_role = "prefill"
        else:
            return None
        self._since = None
        self._last_flip_s[worker.worker_id] = now
        return FlipDecision(worker.worker_id, "mixed", to_role,
                            f"prefill interference for {held_s:.1f} s: decode pressure {p.decode:.2f} >= "
                            f"{self.high:g} from the mixed workers' pace (step_s / tpot {self.tpot_s:g} s) while "
                            f"their slots and blocks have room; worker {worker.worker_id} mixed -> {to_role}")

    # ---- the split: all- or partly-mixed toward prefill + decode at light load -------------
    def _split_move(self, ready: list[WorkerLoad], p: Pressures, now: float) -> tuple | None:
        """The one-step move out of mixed whose side losing the worker keeps room:
        (worker, to_role, that side, its pressure after it, the decode occupancy), or None.
        Only toward a role no ready worker has yet: the split makes one prefill and one
        decode worker (with two workers, disaggregation) and leaves any others mixed (past
        that, light-load pressures cannot tell whether a further split would leave either
        side enough capacity once the load grows; the line's moves reshape it under load).
        Without a prefill worker (and mixed workers keeping what they prefill) mixed ->
        prefill first (a decode worker would go unfed)."""
        cands = [w for w in ready if w.role == "mixed" and self._settled(w, now)]
        if not cands:
            return None
        d_rows = [w for w in ready if w.role in CAN_DECODE]
        p_rows = [w for w in ready if w.role in CAN_PREFILL]
        occupancy = sum(decode_occupancy(w) for w in d_rows) / len(d_rows)
        if p.prefill >= self.room or occupancy >= self.room:  # both sides need room now already
            return None
        moves, roles = [], {w.role for w in ready}
        for to_role, rows, pressure, key in (
                ("prefill", d_rows, occupancy, lambda w: (w.running_reqs + w.waiting_reqs, w.worker_id)),
                ("decode", p_rows, p.prefill, lambda w: (w.queued_prefill_tokens, w.worker_id))):
            if len(rows) < 2 or to_role in roles:  # it stops at one prefill and one decode worker
                continue
            after = pressure * len(rows) / (len(rows) - 1)
            able = [w for w in cands if not self._starves(ready, w, to_role)]
            worker = min(able, key=key) if able else None
            if worker is not None and after < self.room and self._feeds_decode(ready, worker, to_role):
                moves.append((after, to_role, worker))
        if not moves:
            return None
        after, to_role, worker = min(moves, key=lambda m: (m[0], m[1]))
        return worker, to_role, "decode" if to_role == "prefill" else "prefill", after, occupancy

    def _watch_interleaving(self, loads: list[WorkerLoad], now: float) -> None:
        """Prompts interleaved with decodes: a mixed row with prompt tokens queued while it runs
        decodes, or a worker's `interleaved_steps` counter grown since the last call."""
        for w in loads:
            grew = w.interleaved_steps > self._steps_seen.get(w.worker_id, w.interleaved_steps)
            self._steps_seen[w.worker_id] = w.interleaved_steps
            if grew or (w.role == "mixed" and w.queued_prefill_tokens and w.running_reqs):
                self._interleaved_s = now
        self._busy_marks.append((now, {w.worker_id: w.prefill_busy_s for w in loads}))
        while len(self._busy_marks) > 1 and now - self._busy_marks[1][0] >= self.dwell_s:
            self._busy_marks.popleft()  # keep one mark at least dwell_s old (the window's start)

    def _prefill_busy(self, p_rows: list[WorkerLoad], now: float) -> float | None:
        """The prefill-capable workers' mean busy fraction on prompt tokens over the last
        `dwell_s` (the growth of `prefill_busy_s` per second); None before a window of
        `in_place_dwell_s` was seen."""
        then_s, busy_then = self._busy_marks[0]
        window_s = now - then_s
        if window_s <= 0 or window_s < self.in_place_dwell_s:
            return None
        return sum(min(1.0, max(0.0, w.prefill_busy_s - busy_then.get(w.worker_id, w.prefill_busy_s)) / window_s)
                   for w in p_rows) / len(p_rows)

    def _split(self, ready: list[WorkerLoad], p: Pressures, now: float) -> FlipDecision | None:
        """Light load on mixed workers that interleave prompts with decodes (see the module
        docstring): the room held for `in_place_dwell_s` (the flip drains nothing) with
        interleaving seen within `worker_dwell_s`, one mixed worker one step out of mixed."""
        mixed = frozenset(w.worker_id for w in ready if w.role == "mixed")
        move = self._split_move(ready, p, now) if len(ready) >= 2 and mixed and p.decode < self.high else None
        if move is None:
            self._split_since = None
            return None
        if self._split_since is None or self._split_since[1] != mixed:
            self._split_since = (now, mixed)
        held_s = now - self._split_since[0]
        recent = self._interleaved_s is not None and now - self._interleaved_s <= max(self.worker_dwell_s,
                                                                                       self.dwell_s)
        p_rows = [w for w in ready if w.role in CAN_PREFILL]
        busy = self._prefill_busy(p_rows, now)
        if held_s < self.in_place_dwell_s or not recent or busy is None:
            return None
        busy_after = busy * len(p_rows) / (len(p_rows) - 1) if move[1] == "decode" else busy
        if busy_after >= self.room:  # prompts keep the prefill side busy: it would lack capacity
            return None
        worker, to_role, losing, after, occupancy = move
        self._split_since = None
        self._last_flip_s[worker.worker_id] = now
        return FlipDecision(worker.worker_id, "mixed", to_role,
                            f"split after {held_s:.1f} s of light load with prompts interleaved with decodes on "
                            f"mixed workers: prefill pressure {p.prefill:.2f} and decode occupancy {occupancy:.2f} "
                            f"< {self.room:g} (decode pressure {p.decode:.2f} < {self.high:g}), {losing} side "
                            f"{after:.2f} and prefill busy {busy_after:.2f} < {self.room:g} after it; "
                            f"worker {worker.worker_id} mixed -> {to_role}")

    def _reason(self, side: str, p: Pressures, worker: WorkerLoad, to_role: str, held_s: float) -> str:
        move = f"worker {worker.worker_id} {worker.role} -> {to_role}"
        if side == "both":
            return (f"both starved for {held_s:.1f} s: prefill pressure {p.prefill:.2f} and decode pressure "
                    f"{p.decode:.2f} >= {self.high:g}; {move}")
        other = "decode" if side == "prefill" else "prefill"
        return (f"{side} starved for {held_s:.1f} s: {side} pressure {getattr(p, side):.2f} >= {self.high:g}"
                f" while {other} pressure {getattr(p, other):.2f} < {self.room:g}; {move}")
