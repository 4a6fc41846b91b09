"""The front's ZeroMQ PUSH links to its workers: control messages are never dropped.

    send(wid, raw): at once when the socket takes it; when it would block (the worker is
                    not reading: a long step, SIGSTOP, a full pipe), into that worker's
                    backlog, which a task flushes in order (later messages queue behind it,
                    so a worker always receives its messages in the order they were sent)
    reset(wid):     the worker died: its backlog is discarded and its socket replaced, so a
                    restarted worker never receives what was queued for its predecessor
                    (ZeroMQ would deliver a connect-side pipe's queue after the reconnect)

Every send that could not complete at once is counted by reason ("deferred": queued behind
a full socket; "error": a ZeroMQ error, retried; "dead_worker": discarded with a dead
worker's backlog) through `on_failure`, which the engine client feeds into
`tetri:worker_send_failures`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

log = logging.getLogger("tetri.engine")
RETRY_S = 0.1


class WorkerLinks:
    def __init__(self, zctx: zmq.asyncio.Context, endpoint: Callable[[int], str], num_workers: int,
                 on_failure: Callable[[str, int], None], send_hwm: int = 100000) -> None:
        self.zctx = zctx
        self.endpoint = endpoint
        self.on_failure = on_failure
        self.send_hwm = send_hwm
        self.socks: dict[int, zmq.asyncio.Socket] = {}
        self._now: dict[int, zmq.Socket] = {}  # synchronous views: a NOBLOCK send that raises Again
        for wid in range(num_workers):
            self._open(wid)
        self._backlog: dict[int, collections.deque[bytes]] = {}
        self._flushers: dict[int, asyncio.Task] = {}

    def _open(self, wid: int) -> None:
        sock = self.zctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.send_hwm)
        sock.connect(self.endpoint(wid))
        self.socks[wid] = sock
        # An asyncio socket's NOBLOCK send puts Again into the future it returns (where it
        # goes unseen); the synchronous view raises it.
        self._now[wid] = zmq.Socket.shadow(sock.underlying)

    def backlog(self, wid: int) -> int:
        """Messages waiting for worker `wid`'s socket."""
        return len(self._backlog.get(wid, ()))

    def send(self, wid: int, raw: bytes) -> None:
        backlog = self._backlog.get(wid)
        if backlog is not None:
            backlog.append(raw)
            return
        try:
            self._now[wid].send(raw, zmq.NOBLOCK)
            return
        except zmq.Again:
            self.on_failure("deferred", 1)
        except zmq.ZMQError as e:
            log.error("sending to worker %d failed (%s); retrying", wid, e)
            self.on_failure("error", 1)
        self._backlog[wid] = collections.deque([raw])
        self._flushers[wid] = asyncio.get_running_loop().create_task(self._flush(wid))

    async def _flush(self, wid: int) -> None:
        """Send a worker's backlog in order, waiting while its socket is full."""
        backlog = self._backlog[wid]
        try:
            while backlog:
                try:
                    await self.socks[wid].send(backlog[0])
                except zmq.ZMQError as e:
                    log.error("sending to worker %d failed (%s); retrying", wid, e)
                    self.on_failure("error", 1)
                    await asyncio.sleep(RETRY_S)
                    continue
                backlog.popleft()
        finally:
            if self._backlog.get(wid) is backlog:
                del self._backlog[wid]
                self._flushers.pop(wid, None)

    def reset(self, wid: int) -> None:
        """Worker `wid` died: drop what was queued for it and give it a fresh socket."""
        backlog = self._backlog.pop(wid, None)
        task = self._flushers.pop(wid, None)
        if task is not None:
            task.cancel()
        if backlog:
            self.on_failure("dead_worker", len(backlog))
        old = self.socks[wid]
        self._open(wid)
        old.close(linger=0)

    async def close(self) -> None:
        """Stop flushing (shutdown): cancel the flush tasks and forget their backlogs."""
        tasks = list(self._flushers.values())
        self._flushers.clear()
        self._backlog.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def close_sockets(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
