"""The front scheduler's re-placements after a failure, as functions of a `FrontScheduler`
(`sched`): a worker's death (the scheduler forgets the worker; `Lifecycle.worker_dead` lets
go of, migrates or fails each request it held, the migration placed here as a continuation)
and the restart that places parked requests and parked handoffs (`unpark`). Pure code: the
`FrontScheduler` methods of the same names call these; every state change is a
`tetri.sched.handoff.Lifecycle` transition."""

from __future__ import annotations

import msgspec

from tetri.sched.dispatch import NoWorker
from tetri.sched.front_types import Actions, FrontReq
from tetri.sched.load import WorkerLoad


def on_worker_dead(sched, wid: int, loads: list[WorkerLoad] | None = None, migrate: bool = False) -> Actions:
    sched.forget_plans(wid)
    sched.prefix_index.forget(wid)
    sched.decode_index.forget(wid)
    if sched.flip_plan is not None and wid in sched.flip_plan._workers:
        sched.flip_plan.remove_worker(wid)
    place = (lambda req, acts: _migrate(sched, req, loads, acts)) if migrate and loads is not None else None
    return sched.life.worker_dead(wid, place)


def _migrate(sched, req: FrontReq, loads: list[WorkerLoad], acts: Actions) -> bool:
    """Re-queue as a continuation: prompt + emitted tokens, the emitted ones counted as
    outputs (same params: the workers count them against max_tokens and min_tokens)."""
    params = req.params
    if params.structured_outputs is not None:  # the grammar resumes after what was emitted (now in the prompt)
        params = msgspec.structs.replace(params, structured_outputs=msgspec.structs.replace(
            params.structured_outputs, prefix_token_ids=tuple(req.output_ids)))
    sched.life.migrated(req)
    cont = FrontReq(req.req_id, req.prompt_token_ids, params, req.arrival_s,
                    expected_output_tokens=req.expected_output_tokens, prompt_text=req.prompt_text,
                    output_ids=list(req.output_ids), migrations=req.migrations + 1, priority=req.priority,
                    resume_tokens=len(req.output_ids))
    try:
        acts.extend(sched.add(cont, loads, 0.0))
    except NoWorker:  # no live worker of the role: wait for the supervisor's restart
        sched.life.park(cont)
    return True


def _unpark_handoffs(sched, loads: list[WorkerLoad], now: float, acts: Actions) -> None:
    view = sched._view(loads)
    for req_id in list(sched.life.parked_handoffs):
        entry = sched.life.take_parked_handoff(req_id)
        if entry is None:
            continue
        req, wid, res, info = entry
        try:
            did = sched.level2.pick(sched._handoff_targets(view, wid),
                                    sched._decode_prefix(req, info, wid, view))
        except NoWorker:
            return  # still none: they all wait
        sched.life.parked_handoffs.pop(req_id)
        acts.extend(sched.life.hand_off(req, wid, did, res, now))


def unpark(sched, loads: list[WorkerLoad], now: float) -> Actions:
    """A worker came back: place the parked requests (those still waiting), and hand off the
    prefilled ones waiting for a decode worker."""
    acts = Actions()
    _unpark_handoffs(sched, loads, now, acts)
    for req in sched.life.take_parked():
        try:
            acts.extend(sched.add(req, loads, 0.0))
        except NoWorker:
            sched.life.park(req)
    return acts
