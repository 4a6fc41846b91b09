"""The supervisor's I/O, as functions of the `RuntimeClient` (`client`): the loop (every
0.1 s: a worker whose process exited, or whose board row stopped beating, is marked dead; the
scheduler's deadlines and parked requests), a death (what the worker sent first handled, then
what it held migrated or failed, the survivors told), the restart with back-off and a
restarted worker's Ready. The decisions are `supervision.py`'s."""

from __future__ import annotations

import asyncio
import logging
import time

from tetri.protocol import Ready
from tetri.server.supervision import STARTUP_GRACE_S

log = logging.getLogger("tetri.engine")
SUPERVISE_EVERY_S = 0.1


async def supervise_loop(client) -> None:
    while True:
        await asyncio.sleep(SUPERVISE_EVERY_S)
        now = time.monotonic()
        for wid in range(len(client.launch_cfg.workers)):
            if wid in client.dead:
                if wid in client._restart_at and now >= client._restart_at[wid]:
                    restart(client, wid)
                elif wid in client._starting and not client.procs.alive(wid):
                    client._starting.discard(wid)
                    client._after_death(wid, client.procs.last_error(wid), at_start=True)
                continue
            stale = now - client.board.read(wid).heartbeat_s > client.launch_cfg.heartbeat_timeout_s
            if not client.procs.alive(wid) or stale:
                client._on_dead(wid, "exited" if not client.procs.alive(wid) else "stopped heartbeating")
        client._apply(client.scheduler.expire(now))
        if client.scheduler.parked or client.scheduler.parked_handoffs:
            client._apply(client.scheduler.unpark(client._loads(), now))
        if client.scheduler.flip_policy is not None:
            client._apply(client.scheduler.flip_tick(client._loads(), now))
            client.roles_report.take(client.scheduler, client.metrics)  # log, metrics, /workers


def on_dead(client, wid: int, how: str) -> None:
    log.error("worker %d %s; %s what it held", wid, how, "migrating" if client.migrate else "failing")
    client._drain_pending()
    role = client.board.read(wid).role
    client.dead.add(wid)
    proc = client.procs.kill(wid)
    if proc is not None:  # reaped in a thread: never a join on the event loop
        asyncio.get_running_loop().run_in_executor(None, proc.join, 5)
    client.links.reset(wid)
    client.board.set_state(wid, "dead")
    migrated_before = client.scheduler.migrated_total
    client._apply(client.scheduler.on_worker_dead(wid, client._loads(), migrate=client.migrate))
    if client.metrics is not None:
        client.metrics.observe_migrations(client.scheduler.migrated_total - migrated_before)
    client._unlink_pools([wid])
    client._broadcast_pools()  # survivors close their mappings of its pool and stop staging for it
    client._dead_role[wid] = role
    client.kv_paths.pop(wid, None)
    # a worker that already did work started fine, however soon it died after its Ready
    at_start = wid not in client._worked and time.monotonic() - client._ready_at.get(wid, 0.0) < STARTUP_GRACE_S
    client._after_death(wid, client.procs.last_error(wid), at_start)


def after_death(client, wid: int, why: str, at_start: bool) -> None:
    """Restart with back-off, or give up (`supervision.RestartBook`; /health and /workers say why)."""
    role = client._dead_role.get(wid, "?")
    delay = client.restart_book.after_death(wid, role, why, at_start, client.procs.restarts.get(wid, 0))
    if delay is None:
        log.error("%s", client.failed[wid])
        return
    client._restart_at[wid] = time.monotonic() + delay
    log.warning("worker %d (%s) ended (%s); restarting it", wid, role, why)


def restart(client, wid: int) -> None:
    del client._restart_at[wid]
    client._starting.add(wid)
    client.procs.restarts[wid] = client.procs.restarts.get(wid, 0) + 1
    log.warning("restarting worker %d as %s (restart %d)", wid, client._dead_role[wid], client.procs.restarts[wid])
    # spawning pickles the args and forks the spawn helper: a thread's work, not the loop's
    asyncio.get_running_loop().run_in_executor(None, client.procs.spawn, wid, client._dead_role[wid])
    if client.metrics is not None:
        client.metrics.observe_restart()


def on_ready(client, msg: Ready) -> None:
    """A restarted worker is up: revive it and tell every worker where its pool is."""
    client.ready[msg.worker_id] = msg
    client._starting.discard(msg.worker_id)
    client._ready_at[msg.worker_id] = time.monotonic()
    client._worked.discard(msg.worker_id)
    if msg.worker_id in client.dead:
        client.dead.discard(msg.worker_id)
        if client.scheduler.flip_plan is not None:
            client.scheduler.flip_plan.add_worker(msg.worker_id, msg.role)
        client._broadcast_pools()
        client._apply(client.scheduler.unpark(client._loads(), time.monotonic()))
