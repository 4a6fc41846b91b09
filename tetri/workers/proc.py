"""The worker process shell: sockets, load board, signals around a `WorkerNode`.

    spawn -> attach load board -> load model + allocate KV pool -> send Ready
    loop: drain messages (dispatch by type) -> core.step() when it can step -> send outputs
          -> write the board row when it changed
          exit on Shutdown, SIGTERM, or the parent's death (checked every iteration)

A worker that has nothing it can step (idle, or back-pressured: blocks held until a
`Release`, handoffs its policy will not admit yet) blocks on its socket until a message
arrives or the heartbeat interval passes; it never spins. The heartbeat is written by a
thread every `HEARTBEAT_S`, so a step longer than the supervisor's heartbeat timeout does
not get a healthy worker killed. The thread stops beating when the loop itself stops
turning outside a step or a message (`LOOP_STALL_S`): a hung loop is still detected.

A malformed or unknown message is logged and dropped, never fatal. An exception inside a
step is fatal for this worker (its state may be inconsistent): it reports WorkerError and
exits; the supervisor fails or migrates its requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback

import msgspec

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.protocol import Ready, WorkerError, decode_or_none, encode, to_worker_decoder

log = logging.getLogger("tetri.worker")
HEARTBEAT_S = 0.1
LOOP_STALL_S = 5.0
"""Outside a step or a message, the loop turns at least every HEARTBEAT_S; past this the
heartbeat thread stops beating, so the supervisor sees the hang."""


class WorkerArgs(msgspec.Struct, kw_only=True):
    worker_id: int
    role: str
    model: ModelConfig
    cache: CacheConfig
    sched: EngineSchedConfig
    ipc_dir: str
    board_name: str
    num_workers: int
    parent_pid: int
    memory_share: float = 1.0
    threads: int = 1
    collect_hidden: bool = False
    restarts: int = 0

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.ipc_dir}/w{self.worker_id}.sock"

    @property
    def front_endpoint(self) -> str:
        return f"ipc://{self.ipc_dir}/front.sock"


class WorkerShell:
    """Sockets and load board around a `WorkerNode`."""

    def __init__(self, args: WorkerArgs) -> None:
        import zmq

        from tetri.control.load_board import LoadBoard
        from tetri.workers.executor import Executor, cache_for_role
        from tetri.workers.node import WorkerNode

        self.args = args
        self.board = LoadBoard.attach(args.board_name, args.num_workers)
        self.board.write(args.worker_id, role=args.role, state="starting", pid=os.getpid(), restarts=args.restarts)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(args.endpoint)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.connect(args.front_endpoint)
        # shared: peers open the pool (CPU: a named segment; CUDA: an IPC export), with a staging mirror
        self.ex = Executor(args.model, cache_for_role(args.cache, args.role), shared_pool=True,
                           memory_share=args.memory_share, sched=args.sched)
        self.node = WorkerNode(args.worker_id, args.role, self.ex, args.sched, collect_hidden=args.collect_hidden)
        self._board_lock = threading.Lock()
        self._row: dict | None = None  # the fields last written
        self._busy = False  # inside a message or a step
        self._turned_s = time.monotonic()  # when the loop last turned
        self._beat_stop = threading.Event()
        self._beater = threading.Thread(target=self._beat, name="tetri-heartbeat", daemon=True)

    @property
    def stop(self) -> bool:
        return self.node.stop

    def request_stop(self) -> None:
        self.node.stop = True

    def send(self, msg) -> None:
        self.push.send(encode(msg))

    def handle(self, raw: bytes) -> None:
        msg = decode_or_none(to_worker_decoder, raw)
        if msg is None:  # malformed or unknown: logged and dropped, never fatal
            log.warning("worker %d dropped a malformed message (%d bytes)", self.args.worker_id, len(raw))
            return
        for out in self.node.handle(msg, time.monotonic()):
            self.send(out)

    def _write_board(self, state: str) -> None:
        """Write the row when its fields changed (the heartbeat thread refreshes it anyway)."""
        a = self.args
        row = dict(state=state, pid=os.getpid(), restarts=a.restarts, **self.node.board_fields())
        if row == self._row:
            return
        with self._board_lock:
            self.board.write(a.worker_id, **row)
            self._row = row

    def _beat(self) -> None:
        """Heartbeat thread: rewrite the last row (a fresh heartbeat_s) every HEARTBEAT_S while
        the loop is healthy: inside a message or step, or turning."""
        while not self._beat_stop.wait(HEARTBEAT_S):
            if self._row is None or not (self._busy or time.monotonic() - self._turned_s < LOOP_STALL_S):
                continue
            with self._board_lock:
                self.board.write(self.args.worker_id, **self._row)

    def _drain(self) -> None:
        import zmq

        while True:
            try:
                raw = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._busy = True
            try:
                self.handle(raw)
            finally:
                self._busy = False

    def run(self) -> None:
        from tetri.workers.node import pool_info

        a = self.args
        self._write_board("ready")  # before Ready: the front may dispatch as soon as it hears it
        self.send(Ready(worker_id=a.worker_id, pid=os.getpid(), role=self.node.role, device=a.model.device,
                        pool=pool_info(self.ex.pool), max_model_len=self.ex.max_model_len,
                        eos_token_ids=list(self.ex.eos_token_ids)))
        self._beater.start()
        while not self.stop:
            self._turned_s = time.monotonic()
            if self.pull.poll(0 if self.node.can_step() else int(HEARTBEAT_S * 1000)):
                self._drain()
            elif self.node.stalled:
                self.node.stalled = False  # a quiet heartbeat interval: try the step once more
            if self.stop or os.getppid() != a.parent_pid:  # told to stop, or the front died
                break
            if self.node.can_step():
                self._busy = True
                try:
                    for out in self.node.step(time.monotonic()):
                        self.send(out)
                finally:
                    self._busy = False
            self._write_board("ready")

    def close(self) -> None:
        self._beat_stop.set()
        if self._beater.is_alive():
            self._beater.join(1.0)
        for sock in (self.pull, self.push):
            sock.close(linger=500)
        self.ctx.term()
        self.node.close_peers()
        self.ex.close()
        self.board.close()


def error_path(ipc_dir: str, worker_id: int) -> str:
    """Where a worker leaves the reason it died (read by the supervisor's restart decision)."""
    return os.path.join(ipc_dir, f"w{worker_id}.error")


def _record_fatal(args: WorkerArgs, e: BaseException) -> None:
    try:
        with open(error_path(args.ipc_dir, args.worker_id), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
    except OSError:
        pass


def worker_main(args: WorkerArgs) -> None:
    """Spawn target. Exits 0 on a clean stop, 1 after a fatal error."""
    from tetri.workers.cuda_ipc import forced_alloc_conf

    # Before torch is imported (the parent already set it for us, tetri/launch.py): CUDA IPC
    # cannot export memory from expandable segments.
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = forced_alloc_conf(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{args.worker_id} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front handles Ctrl-C and tells us
    import torch

    from tetri.workers.memory import bind_device

    bind_device(args.model.device)  # before anything touches CUDA: streams and allocations land on our GPU
    torch.set_num_threads(max(1, args.threads))
    shell = None
    code = 0
    try:
        shell = WorkerShell(args)
        signal.signal(signal.SIGTERM, lambda *_: shell.request_stop())
        shell.run()
    except Exception as e:  # fatal: report and exit non-zero
        log.error("worker %d failed: %s", args.worker_id, traceback.format_exc())
        _record_fatal(args, e)
        if shell is not None:
            try:
                shell.send(WorkerError(worker_id=args.worker_id, message=f"{type(e).__name__}: {e}"))
            except Exception:
                pass
        code = 1
    finally:
        if shell is not None:
            shell.close()
    exit_now(code)


def exit_now(code: int) -> None:
    """End the worker process once its shell is closed (sockets, mappings, board), skipping the
    interpreter's teardown: its final garbage collection over the model's objects took ~4 s of
    every worker's exit on 2 cores (the front's join waited it out on every shutdown)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
