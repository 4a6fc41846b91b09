"""The real `EngineClient`: drives the pure front scheduler and the worker processes.

    start(): load board + ipc dir -> spawn workers -> READY handshake (timeout) -> PeerPools
    submit(): admission bound -> FrontScheduler.add (level-1 dispatch, chunk packing) -> sends
    recv loop: Ready | ChunkDone (first tokens straight to the client: TTFT never waits for
               decode) | KVCopied | Dropped | TokenBatch (demultiplexed into each request's
               mailbox) | WorkerError
    supervise loop (every 0.1 s): a worker whose process exited, or whose board row stopped
               beating, is marked dead; the scheduler fails or releases what it held
    close(): Shutdown to every worker -> join / terminate / kill -> unlink shared memory,
             remove the ipc dir

One receive path: every message is read by `_drain_pending` (synchronous reads until the
socket is empty); the recv loop only waits for readability, and a death drains through the
same function first, so messages from one worker are handled in the order it sent them.
No control message is dropped (`worker_links.WorkerLinks`: a send that would block queues
and is retried in order; failures counted in `tetri:worker_send_failures`; a dead worker's
queue and socket are discarded). Nothing slow runs on the event loop: the tokenizer
load, prompt decodes and learned-predictor inference run on one helper thread, the length
log writes on its own thread, and a killed worker is reaped in a thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import pathlib
import random
import time
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.control.load_board import SWAP_FIELDS, LoadBoard
from tetri.launch import LaunchConfig, WorkerProcs
from tetri.protocol import (ChunkDone, ChunkPlan, Dropped, KVCopied, PeerPaths, PeerPools, Ready, Shutdown,
                            TokenBatch, WorkerError, decode_or_none, encode, from_worker_decoder)
from tetri.sched.dispatch import NoWorker
from tetri.sched.front import Actions, FrontConfig, FrontReq, FrontScheduler
from tetri.sched.load import fit_error
from tetri.server.engine_api import (EngineError, EngineOutput, EngineRequest, InvalidRequest, Overloaded,
                                     RequestStream, Unavailable)
from tetri.server import supervisor, worker_messages
from tetri.server.supervision import RestartBook, missing_roles_reason, worker_fields
from tetri.server.worker_links import WorkerLinks

log = logging.getLogger("tetri.engine")


class RuntimeClient:
    def __init__(self, model: ModelConfig, cache: CacheConfig, sched: EngineSchedConfig, front: FrontConfig,
                 launch: LaunchConfig, max_queue: int = 1024, seed: int = 0, predictor=None,
                 flip=None, length_log=None, migrate: bool = True, max_restarts: int = 5,
                 roles_report=None) -> None:
        from tetri.workers.models.source import resolve_model_dir  # no torch in the front process

        self.model_dir = resolve_model_dir(model.model, model.dtype, model.device)
        self.model_cfg = dataclasses.replace(model, model=self.model_dir)
        self.cache_cfg, self.sched_cfg, self.launch_cfg = cache, sched, launch
        self.max_queue = max_queue
        self.max_model_len = model.max_model_len or 0
        from tetri.sched.prefix_hash import hash_seed

        front = dataclasses.replace(front, prefix_caching=cache.enable_prefix_caching,
                                    prefix_hash_seed=hash_seed(str(pathlib.Path(self.model_dir))))  # as the workers
        self.scheduler = FrontScheduler(front, random.Random(seed), predictor=predictor, flip=flip)
        self.length_log = length_log  # tetri.server.length_log.LengthLog or None
        from tetri.sched.roles import RolePolicy
        from tetri.server.roles_report import RolesReport

        self.adaptive = isinstance(flip, RolePolicy)  # --mode auto (the scheduler runs it the same way)
        self.roles_report = roles_report or RolesReport("auto" if self.adaptive else "static")
        self.wants_prompt_text = length_log is not None or getattr(predictor, "kind", None) == "text"
        self.predict_off_loop = getattr(predictor, "kind", None) is not None  # a learned (torch) model
        self._tok = None
        self._aux = ThreadPoolExecutor(1, thread_name_prefix="tetri-front-aux")  # FIFO: decodes before predictions
        self._texts: dict = {}  # req_id -> Future of its prompt text
        self.send_failures: collections.Counter = collections.Counter()
        self.metrics = None  # set by create_app
        self.streams: dict[str, RequestStream] = {}
        self.ready: dict[int, Ready] = {}
        self.dead: set[int] = set()
        self._dispatched: dict[str, float] = {}
        self.migrate = migrate
        self.max_restarts = max_restarts
        self._restart_at: dict[int, float] = {}
        self._dead_role: dict[int, str] = {}  # role to restart a dead worker in
        self._starting: set[int] = set()  # restarted, no Ready yet
        self._ready_at: dict[int, float] = {}
        self._worked: set[int] = set()  # workers that sent a step's result since their last Ready
        self.restart_book = RestartBook(max_restarts)
        self.failed = self.restart_book.failed  # workers no longer restarted, and why
        self.kv_paths: dict[int, PeerPaths] = {}  # decode worker -> the transfer path to each peer pool
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        n = len(self.launch_cfg.workers)
        self.wire()
        self.procs.spawn_all()
        try:
            await asyncio.wait_for(self._handshake(n), self.launch_cfg.ready_timeout_s)
        except (asyncio.TimeoutError, RuntimeError) as e:
            await self.close()
            raise RuntimeError(f"workers did not become ready: {e or 'timeout'}") from e
        self.max_model_len = min(r.max_model_len for r in self.ready.values())
        if self.wants_prompt_text:
            self._tok = await asyncio.get_running_loop().run_in_executor(self._aux, self._load_tokenizer)
        self._broadcast_pools()
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(supervisor.supervise_loop(self))]

    def wire(self) -> None:
        """The load board, the ipc directory and the sockets (`start` then spawns the workers)."""
        n = len(self.launch_cfg.workers)
        self.board = LoadBoard.create(n)
        self.procs = WorkerProcs(self.model_cfg, self.cache_cfg, self.sched_cfg, self.launch_cfg, self.board.name)
        self.zctx = zmq.asyncio.Context()
        self.pull = self.zctx.socket(zmq.PULL)
        self.pull.bind(self.procs.front_endpoint)
        self._pull_now = zmq.Socket.shadow(self.pull.underlying)  # the one reader (see _drain_pending)
        self.links = WorkerLinks(self.zctx, self.procs.endpoint, n, self._count_send_failure)

    async def _handshake(self, n: int) -> None:
        while len(self.ready) < n:
            if not all(self.procs.alive(w) for w in range(n) if w not in self.ready):
                raise RuntimeError("a worker exited during start-up (see its log)")
            if await self.pull.poll(200):
                msg = self._decode(await self.pull.recv())
                if isinstance(msg, Ready):
                    self.ready[msg.worker_id] = msg
                    self._ready_at[msg.worker_id] = time.monotonic()
                elif isinstance(msg, WorkerError):
                    raise RuntimeError(f"worker {msg.worker_id}: {msg.message}")

    def _broadcast_pools(self) -> None:
        pools = {wid: r.pool for wid, r in self.ready.items() if wid not in self.dead}
        for wid in pools:
            self._send(wid, PeerPools(pools=pools))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for stream in self.streams.values():
            stream.put(EngineOutput(req_id=stream.req_id, choices=[], error="server shutting down"))
        for wid in self.links.socks:
            self._send(wid, Shutdown())  # behind whatever is still queued for it
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.procs.stop_all)
        await self.links.close()  # stragglers were terminated: drop what they never read
        self.links.close_sockets()
        self.pull.close(linger=0)
        self.zctx.term()
        self._unlink_pools(self.ready)
        self.board.close()
        self.procs.remove_ipc_dir()
        await loop.run_in_executor(None, self._aux.shutdown)  # finish the decodes the length log waits for
        if self.length_log is not None:
            await loop.run_in_executor(None, self.length_log.close)

    def _unlink_pools(self, workers) -> None:
        """Workers unlink their own pools; this catches those of workers that were killed."""
        from multiprocessing import shared_memory

        for wid in list(workers):
            pool = self.ready[wid].pool if wid in self.ready else None
            for name in (pool.shm_name, pool.stage_shm) if pool is not None else ():
                if name:
                    with contextlib.suppress(FileNotFoundError):
                        shm = shared_memory.SharedMemory(name=name)
                        shm.close()
                        shm.unlink()

    # ---- the EngineClient API ------------------------------------------------------------
    def submit(self, req: EngineRequest) -> RequestStream:
        if self._closed:
            raise Unavailable("server is shutting down")
        if len(self.scheduler.reqs) >= self.max_queue:
            raise Overloaded(f"admission queue full ({self.max_queue} requests)")
        loads = self._loads()
        why = fit_error(len(req.prompt_token_ids), req.params.n, loads)
        if why is not None:
            raise InvalidRequest(why)
        expected = req.expected_output_tokens
        if expected is None and req.params.ignore_eos:
            expected = req.params.max_tokens  # the length is forced: what an oracle would know
        text = req.prompt_text
        front_req = FrontReq(req.req_id, list(req.prompt_token_ids), req.params, req.arrival_s or time.monotonic(),
                             expected_output_tokens=expected, prompt_text=text, priority=req.priority)
        try:
            acts = self.scheduler.add(front_req, loads, time.monotonic())
        except NoWorker as e:
            raise Unavailable("no live worker can take the request") from e
        if text is None and self.wants_prompt_text and self._tok is not None:  # decoded off the loop
            text = self._texts[req.req_id] = self._aux.submit(self._tok.decode, front_req.prompt_token_ids)
        stream = RequestStream(req.req_id, req.params.n)
        self.streams[req.req_id] = stream
        if self.length_log is not None:
            self.length_log.start(req.req_id, text, len(req.prompt_token_ids), req.params.n)
        self._apply(acts)
        return stream

    def abort(self, req_id: str, index: int | None = None) -> None:
        self._apply(self.scheduler.abort(req_id, index))
        if index is None:
            self._ended(req_id)

    def _ended(self, req_id: str) -> None:
        """The client's side of a request is over (finished, failed or aborted): forget it."""
        self.streams.pop(req_id, None)
        self._dispatched.pop(req_id, None)
        self._texts.pop(req_id, None)
        if self.length_log is not None:
            self.length_log.forget(req_id)

    def fail_all(self, why: str) -> None:
        """End every running request with an error (shutdown past its timeout)."""
        for req_id in list(self.scheduler.reqs):
            self._apply(self.scheduler.fail_request(req_id, why))

    def healthy(self) -> bool:
        if self._closed or not self.ready:
            return False
        roles, live = self._required_roles()
        return roles <= live

    def _required_roles(self) -> tuple[set[str], set[str]]:
        """(roles that need a live worker, roles live now); --mode auto moves workers between
        roles, so there it is the phases: a live worker able to prefill and one able to decode."""
        live = {w.role for w in self._loads() if w.alive}
        if not self.adaptive:
            return {spec.role for spec in self.launch_cfg.workers}, live
        from tetri.server.roles_report import phases

        return {"prefill", "decode"}, phases(live)

    def unhealthy_reason(self) -> str | None:
        """Why /health is 503: the roles without a live worker, and the workers given up on."""
        if self._closed or not self.ready:
            return "server shutting down" if self._closed else "workers are starting"
        return missing_roles_reason(*self._required_roles(), self.failed)

    def roles(self) -> dict:
        """The role policy's report for /workers: mode, start, last decision with its reason."""
        return self.roles_report.view()

    def num_running(self) -> int:
        return len(self.scheduler.reqs)

    def workers(self) -> list[dict]:
        rows = []
        for w in self.board.read_all():
            rows.append(dict(worker_id=w.worker_id, role=w.role, device=self.launch_cfg.workers[w.worker_id].device,
                             pid=self.procs.pid(w.worker_id),
                             state="dead" if w.worker_id in self.dead else w.state,
                             kv_blocks_used=w.total_blocks - w.free_blocks, kv_blocks_total=w.total_blocks,
                             running=w.running_reqs, waiting=w.waiting_reqs,
                             queued_prefill_tokens=w.queued_prefill_tokens,
                             prefix_cache_queries=w.prefix_cache_queries, prefix_cache_hits=w.prefix_cache_hits,
                             prefix_cache_hit_rate=w.prefix_cache_hits / w.prefix_cache_queries
                             if w.prefix_cache_queries else 0.0,
                             host_prefix_cache_hits=w.host_prefix_cache_hits,
                             kv_offloaded_blocks=w.kv_offloaded_blocks, kv_uploaded_blocks=w.kv_uploaded_blocks,
                             handoff_blocks_copied=w.handoff_blocks_copied,
                             handoff_blocks_cached=w.handoff_blocks_cached,
                             **{k: getattr(w, k) for k in SWAP_FIELDS},  # the KV swap's (issue 19 item 5)
                             restarts=self.procs.restarts.get(w.worker_id, 0), step_s=w.step_s,
                             flip_state=self.roles_report.flip_state(self.scheduler, w.worker_id)))
            rows[-1] |= worker_fields(w.worker_id, self.failed, self.kv_paths, self.dead)
        return rows

    # ---- internals -----------------------------------------------------------------------
    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def _loads(self):
        return [w if w.worker_id not in self.dead else _dead(w) for w in self.board.read_all()]

    def _count_send_failure(self, reason: str, count: int = 1) -> None:
        self.send_failures[reason] += count
        if self.metrics is not None:
            self.metrics.observe_send_failure(reason, count)

    def _send(self, wid: int, msg) -> None:
        if wid not in self.dead:  # what a dead worker held is handled by on_worker_dead
            self.links.send(wid, encode(msg))

    def _apply(self, acts: Actions) -> None:
        now = time.monotonic()
        for wid, msg in acts.sends:
            if isinstance(msg, ChunkPlan):
                for p in msg.pieces:
                    if p.new is not None:
                        self._dispatched[p.req_id] = now - p.new.arrival_s
            self._send(wid, msg)
        for req_id, why in acts.fails:
            stream = self.streams.get(req_id)
            if stream is not None:
                stream.put(EngineOutput(req_id=req_id, choices=[], error=why))
            self._ended(req_id)

    @staticmethod
    def _decode(raw: bytes):
        msg = decode_or_none(from_worker_decoder, raw)
        if msg is None:
            log.warning("dropped a malformed worker message (%d bytes)", len(raw))
        return msg

    async def _recv_loop(self) -> None:
        while True:
            await self.pull.poll()  # only waits: the messages are read by _drain_pending
            self._drain_pending()

    def _on_message(self, msg) -> None:
        if msg is None:
            return
        if getattr(msg, "worker_id", None) in self.dead and not isinstance(msg, Ready):
            return  # sent before it died; what it held has been failed or migrated
        if isinstance(msg, (TokenBatch, ChunkDone, KVCopied)):
            self._worked.add(msg.worker_id)
        match msg:
            case TokenBatch():
                worker_messages.on_tokens(self, msg)
            case ChunkDone():
                worker_messages.on_chunk_done(self, msg)
            case KVCopied():
                if self.metrics is not None:
                    self.metrics.observe_kv_transfer(msg.num_bytes, msg.seconds, msg.path)
                self._apply(self.scheduler.on_kv_copied(msg))
            case Dropped():
                self._apply(self.scheduler.on_dropped(msg.req_id))
            case WorkerError():
                log.error("worker %d: %s", msg.worker_id, msg.message)
                if msg.req_id is not None:
                    self._apply(self.scheduler.fail_request(msg.req_id, msg.message))
            case Ready():
                supervisor.on_ready(self, msg)
            case PeerPaths():
                self._on_peer_paths(msg)

    def _drain_pending(self) -> None:
        """The one receive path: handle every message already delivered, in order. The recv
        loop calls it when the socket is readable; a death calls it first, so what a dead
        worker sent before dying is counted before its requests are migrated."""
        while True:
            try:
                raw = self._pull_now.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_message(self._decode(raw))
            except Exception:  # one bad message must never stop the loop
                log.exception("error handling a worker message")

    def _on_dead(self, wid: int, how: str) -> None:
        supervisor.on_dead(self, wid, how)

    def _after_death(self, wid: int, why: str, at_start: bool) -> None:
        """Restart with back-off, or give up (`supervision.RestartBook`; /health and /workers say why)."""
        supervisor.after_death(self, wid, why, at_start)

    def _on_peer_paths(self, msg: PeerPaths) -> None:
        worker_messages.on_peer_paths(self, msg)


def _dead(w):
    from dataclasses import replace

    return replace(w, state="dead")


__all__ = ["RuntimeClient", "EngineError"]
