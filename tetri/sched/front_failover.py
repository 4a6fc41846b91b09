"""The front scheduler's failure paths, as functions of a `FrontScheduler` (`sched`): a
worker's death (each request it held migrated or failed, the survivors' parts released),
the restart that places parked requests (`unpark`), and the deadlines (`expire`). Pure code:
the `FrontScheduler` methods of the same names call these."""

from __future__ import annotations

import msgspec

from tetri.protocol import Abort, Release
from tetri.sched.dispatch import NoWorker
from tetri.sched.front_types import Actions, FrontReq, ReqState
from tetri.sched.load import WorkerLoad


def on_worker_dead(sched, wid: int, loads: list[WorkerLoad] | None = None, migrate: bool = False) -> Actions:
    acts = Actions()
    sched.packers.pop(wid, None)
    sched.outstanding.pop(wid, None)
    sched.prefix_index.forget(wid)
    sched.decode_index.forget(wid)
    if sched.flip_plan is not None and wid in sched.flip_plan._workers:
        sched.flip_plan.remove_worker(wid)
    for req in list(sched.reqs.values()):
        lost = (req.decode_worker == wid and req.state in (ReqState.AWAIT_DECODE, ReqState.DECODING)) or \
               (req.prefill_worker == wid and req.state in (ReqState.QUEUED, ReqState.PREFILLING, ReqState.AWAIT_DECODE))
        if not lost:
            continue
        _let_go(sched, req, wid, acts)
        if req.aborting:  # its Dropped will never come: the prefill copy was just released
            sched._drop(req.req_id)
            continue
        if migrate and req.params.n == 1 and loads is not None and _migrate(sched, req, loads, acts):
            continue
        phase = "decoding" if req.decode_worker == wid else "prefilling"
        _fail(sched, req, f"worker {wid} died while {phase} this request", acts)
    return acts


def _let_go(sched, req: FrontReq, dead: int, acts: Actions) -> None:
    """Tell the surviving holder of a request on a dead worker to drop its part."""
    if req.prefill_worker != dead and req.holds_prefill_blocks:
        acts.send(req.prefill_worker, Release(req_id=req.req_id))
    if req.decode_worker not in (None, dead):
        acts.send(req.decode_worker, Abort(req_id=req.req_id))
    if req.prefill_worker != dead and req.state is ReqState.PREFILLING and req.prefill_worker in sched.packers:
        sched.packers[req.prefill_worker].remove(req.req_id)
        acts.send(req.prefill_worker, Abort(req_id=req.req_id))


def _migrate(sched, req: FrontReq, loads: list[WorkerLoad], acts: Actions) -> bool:
    """Re-queue as a continuation: prompt + emitted tokens, the emitted ones counted as
    outputs (same params: the workers count them against max_tokens and min_tokens)."""
    params = req.params
    if params.structured_outputs is not None:  # the grammar resumes after what was emitted (now in the prompt)
        params = msgspec.structs.replace(params, structured_outputs=msgspec.structs.replace(
            params.structured_outputs, prefix_token_ids=tuple(req.output_ids)))
    sched._released(req.req_id, req.prefill_worker)
    sched._released(req.req_id, req.decode_worker)
    sched.reqs.pop(req.req_id)
    cont = FrontReq(req.req_id, req.prompt_token_ids, params, req.arrival_s,
                    expected_output_tokens=req.expected_output_tokens, prompt_text=req.prompt_text,
                    output_ids=list(req.output_ids), migrations=req.migrations + 1, priority=req.priority,
                    resume_tokens=len(req.output_ids))
    try:
        acts.extend(sched.add(cont, loads, 0.0))
    except NoWorker:  # no live worker of the role: wait for the supervisor's restart
        cont.prefill_worker = None
        sched.reqs[cont.req_id] = cont
        sched.parked.append(cont.req_id)
    sched.migrated_total += 1
    return True


def park_handoff(sched, req: FrontReq, wid: int, res, info, now: float) -> None:
    """No live decode worker for a prefilled request: its prefill worker keeps the KV until a
    decode worker is back (`unpark`), or the handoff deadline fails it (`expire`)."""
    req.state, req.decode_worker = ReqState.AWAIT_DECODE, None
    req.deadline_s = now + sched.cfg.handoff_timeout_s
    sched.parked_handoffs[req.req_id] = (req, wid, res, info)


def _unpark_handoffs(sched, loads: list[WorkerLoad], now: float, acts: Actions) -> None:
    view = sched._view(loads)
    for req_id, (req, wid, res, info) in list(sched.parked_handoffs.items()):
        if sched.reqs.get(req_id) is not req or req.aborting or req.prefill_worker != wid:
            sched.parked_handoffs.pop(req_id)  # gone, or moved on (a migration) since it parked
            continue
        try:
            did = sched.level2.pick(sched._handoff_targets(view, wid),
                                    sched._decode_prefix(req, info, wid, view))
        except NoWorker:
            return  # still none: they all wait
        sched.parked_handoffs.pop(req_id)
        sched._hand_off(req, wid, did, res, now, acts)


def unpark(sched, loads: list[WorkerLoad], now: float) -> Actions:
    """A worker came back: place the parked requests (those still waiting), and hand off the
    prefilled ones waiting for a decode worker."""
    acts = Actions()
    _unpark_handoffs(sched, loads, now, acts)
    waiting, sched.parked = sched.parked, []
    for req_id in waiting:
        req = sched.reqs.pop(req_id, None)
        if req is None:
            continue
        try:
            acts.extend(sched.add(req, loads, 0.0))
        except NoWorker:
            sched.reqs[req_id] = req
            sched.parked.append(req_id)
    return acts


def _fail(sched, req: FrontReq, why: str, acts: Actions) -> None:
    sched._drop(req.req_id)
    sched.parked = [r for r in sched.parked if r != req.req_id]
    if not req.aborting:
        acts.fails.append((req.req_id, why))


def expire(sched, now: float) -> Actions:
    """Every state has a deadline: the handoff must be admitted within handoff_timeout_s,
    and no request outlives request_timeout_s."""
    acts = Actions()
    for req in list(sched.reqs.values()):
        if req.aborting:
            if now > req.deadline_s:  # the decode worker never confirmed the drop
                if req.holds_prefill_blocks:
                    acts.send(req.prefill_worker, Release(req_id=req.req_id))
                sched._drop(req.req_id)
            continue
        if req.state is ReqState.AWAIT_DECODE and now > req.deadline_s:
            what = "no live decode worker" if req.decode_worker is None else "KV handoff not admitted"
            acts.extend(sched.abort(req.req_id))
            acts.fails.append((req.req_id, f"{what} within {sched.cfg.handoff_timeout_s:.0f} s"))
        elif now - req.arrival_s > sched.cfg.request_timeout_s:
            acts.extend(sched.abort(req.req_id))
            acts.fails.append((req.req_id, f"request exceeded its {sched.cfg.request_timeout_s:.0f} s deadline"))
    return acts
