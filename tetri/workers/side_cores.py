"""Side cores: the role cores a worker runs besides the one of its role (`--mode auto`).

A `WorkerNode` has one role and its core (`node.core`). Adaptive roles add two cases where
it runs another core on the same executor (weights, pool, block manager) at the same time:

  * an in-place flip to `mixed` (`FlipPlan(in_place_to_mixed=True)`): the old prefill or
    decode core keeps running what it holds (prefill: the chunks the front already sent and
    the prefilled prompts until their `Release`; decode: its decodes and the handoffs sent
    before the flip) while the new mixed core takes new requests. The old core is dropped
    once it holds nothing, so no request is moved, re-sent or lost by the flip;
  * an in-place flip out of `mixed` (`FlipPlan(in_place_out_of_mixed=True)`): to `decode`,
    the old mixed core finishes the prompts it holds and decodes them and its running
    requests, while the decode core (the mixed worker's handoff core, if it had one) takes
    the new handoffs; to `prefill`, the old mixed core finishes what it holds (its prompts
    included: a mixed worker keeps what it prefills) and takes nothing new, while a prefill
    core takes the new prompts and hands them off, and the handoff core decodes the handoffs
    it took before the flip. The front sends the worker no new work of the phase it gave up
    from the moment the flip began, so the old core only shrinks; it is dropped once empty;
  * a `mixed` worker taking handoffs (level 2 may pick it): a decode core, created at the
    first `Handoff`, copies the prompt's KV in and decodes it, as a decode worker would.

Messages go to the core that runs that phase: `ChunkPlan`/`Release` to a prefill core,
`Handoff` to a decode core, `Abort` to every core (each ignores what it does not hold;
a decode core answers `Dropped` as a decode worker does). Each node step runs one step of
the role core and one of each side core. `side` never holds a core of the node's own
role: a flip back to a role whose core still runs as a side core makes it the role core
again. A flip between prefill and decode drains (the front waits until the worker holds
nothing, side cores included), so `_set_role` then starts clean.
"""

from __future__ import annotations

from tetri.protocol import Abort, ChunkPlan, Dropped, Handoff, PeerPools, Release, WorkerError
from tetri.sched.flip import IN_PLACE_OUT_OF_MIXED, IN_PLACE_TO_MIXED

IN_PLACE = IN_PLACE_TO_MIXED | IN_PLACE_OUT_OF_MIXED
"""(old role, new role) of the flips a worker makes while it holds work (`WorkerNode._set_role`)."""


def route(node, msg, now: float) -> list | None:
    """Handle `msg` in a side core; None when it is the role core's (or every core's) message."""
    side = node.side
    match msg:
        case ChunkPlan() | Release() if node.role != "prefill" and "prefill" in side:
            if isinstance(msg, ChunkPlan):
                side["prefill"].submit(msg)
            else:
                side["prefill"].release(msg.req_id)
            return []
        case Handoff() if node.role != "decode" and (node.role == "mixed" or "decode" in side):
            if "decode" not in side:
                side["decode"] = node._make_core("decode")  # opens the peer pools it copies from
            side["decode"].handoff(msg, now)
            return []
    return None


def abort(node, msg: Abort) -> list:
    """The side cores' part of an Abort (the role core handles its own)."""
    out = []
    for role, core in node.side.items():
        if role == "prefill":
            core.abort(msg.req_id)
        elif role == "mixed":  # a flip out of mixed: the old core's requests (no Dropped: none was handed)
            core.abort(msg.req_id) if msg.choice is None else core.abort_choice(msg.req_id, msg.choice)
        elif core.abort(msg.req_id, msg.choice) and msg.choice is None:
            out.append(Dropped(worker_id=node.worker_id, req_id=msg.req_id))
    return out


def peers(node, msg: PeerPools) -> None:
    """A side decode core's peer pools follow the same PeerPools as a decode worker's."""
    core = node.side.get("decode")
    if core is None:
        return
    for wid in [w for w in core.peers if w not in msg.pools or node.peer_infos.get(w) != msg.pools[w]]:
        core.retire_peer(wid)
    for wid, info in msg.pools.items():
        if wid != node.worker_id and wid not in core.peers:
            core.add_peer(wid, node._open_peer(info))


def close(node) -> None:
    """Drop every side core (they hold nothing: a drained worker changes role)."""
    for role, core in node.side.items():
        if role == "decode":
            for wid in list(core.peers):
                core.retire_peer(wid)
    node.side.clear()


def holds_work(role: str, core) -> bool:
    if role == "prefill":
        return bool(core.chunks or core.seqs)  # chunks to run, or prefilled prompts awaiting Release
    return core.has_work()


def has_work(node) -> bool:
    return any(core.has_work() for core in node.side.values())


def step(node, now: float, token_batch) -> tuple[list, bool]:
    """One step of each side core: (messages to send, whether any progressed). A retired
    prefill or decode core that holds nothing any more is dropped; a mixed worker's decode
    core stays (its peer mappings are kept for the next handoff). `token_batch`: the node's
    (worker id, sampled) -> TokenBatch."""
    from tetri.workers import kv_stage

    out, progressed = [], False
    for role, core in list(node.side.items()):
        if role == "prefill":
            done = core.step() if core.has_work() else None
            if done is not None:
                kv_stage.stage_finished(node.ex, core, done)
                out.append(done)
                progressed = True
        elif role == "mixed":  # after a flip out of mixed: its prompts and decodes, nothing new
            sampled = core.step() if core.has_work() else []
            out.extend(WorkerError(worker_id=node.worker_id, message=why, req_id=req_id)
                       for req_id, why in core.errors)
            core.errors.clear()
            if sampled:
                out.append(token_batch(node.worker_id, sampled))
            progressed = progressed or core.progressed
        elif core.has_work():
            sampled, acks = core.step(now)
            out.extend(acks)
            if sampled:
                out.append(token_batch(node.worker_id, sampled))
            progressed = progressed or core.progressed
        if not holds_work(role, core) and not (role == "decode" and node.role == "mixed"):
            if role == "decode":  # close its peer mappings (no copy reads them any more)
                for wid in list(core.peers):
                    core.retire_peer(wid)
            del node.side[role]
    return out, progressed


def adopt(node, old_role: str, old_core) -> None:
    """In-place flip (`IN_PLACE`): keep the old core as a side core while it holds work."""
    if holds_work(old_role, old_core):
        node.side[old_role] = old_core


def board_fields(node, fields: dict) -> dict:
    """The row counts every core's work: the front drains and the policy reads the sums."""
    for role, core in node.side.items():
        if role == "prefill":
            fields["queued_prefill_tokens"] = fields.get("queued_prefill_tokens", 0) + core.queued_tokens
            fields["running_reqs"] = fields.get("running_reqs", 0) + core.num_prefilling
            fields["waiting_reqs"] = fields.get("waiting_reqs", 0) + len(core.done)
        elif role == "mixed":  # as a mixed worker's row (node.board_fields)
            fields["queued_prefill_tokens"] = fields.get("queued_prefill_tokens", 0) + core.packer.queued_tokens
            fields["running_reqs"] = fields.get("running_reqs", 0) + len(core.running)
            fields["waiting_reqs"] = fields.get("waiting_reqs", 0) + core.num_waiting
            fields["interleaved_steps"] = fields.get("interleaved_steps", 0) + core.interleaved_steps
            fields["prefill_busy_s"] = fields.get("prefill_busy_s", 0.0) + core.prefill_busy_s
            for key, value in (("preemptions_swap", core.swaps), ("preemptions_recompute", core.recomputes),
                               ("swapped_reqs", len(core.swapped))):
                fields[key] = fields.get(key, 0) + value
        else:
            for key, value in core.load().items():
                fields[key] = fields.get(key, 0) + value
            fields["handoff_blocks_copied"] = fields.get("handoff_blocks_copied", 0) + core.handoff_blocks_copied
            fields["handoff_blocks_cached"] = fields.get("handoff_blocks_cached", 0) + core.handoff_blocks_cached
            for key, value in (("preemptions_swap", core.swaps), ("preemptions_recompute", core.recomputes),
                               ("swapped_reqs", len(core.swapped))):  # the KV swap's (the pool's are shared)
                fields[key] = fields.get(key, 0) + value
    return fields


__all__ = ["IN_PLACE", "route", "abort", "peers", "step", "adopt", "board_fields", "has_work", "close"]
