"""The worker process shell: sockets, load board, signals; the role core does the work.

    spawn -> attach load board -> load model + allocate KV pool -> send Ready
    loop: drain messages (dispatch by type) -> core.step() -> send outputs -> write board row
          exit on Shutdown, SIGTERM, or the parent's death (checked every iteration)

A malformed or unknown message is logged and dropped, never fatal. An exception inside a
step is fatal for this worker (its state may be inconsistent): it reports WorkerError and
exits; the supervisor fails or migrates its requests.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback

import msgspec

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.protocol import (Abort, ChunkPlan, Dropped, Handoff, PeerPools, PoolInfo, Ready, Release, SetRole,
                            Shutdown, SubmitMixed, TokenBatch, WorkerError, encode, to_worker_decoder)

log = logging.getLogger("tetri.worker")
HEARTBEAT_S = 0.1


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


def pool_info(pool) -> PoolInfo:
    lay = pool.layout
    return PoolInfo(num_blocks=lay.num_blocks, num_layers=lay.num_layers, block_size=lay.block_size,
                    num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, dtype=lay.dtype, shm_name=pool.shm_name)


def open_pool(info: PoolInfo):
    from tetri.workers.kv_pool import KVPool, PoolLayout

    layout = PoolLayout(info.num_blocks, info.num_layers, info.block_size, info.num_kv_heads, info.head_dim, info.dtype)
    if info.shm_name is None:
        raise RuntimeError("peer pool has no shared-memory name (CUDA IPC pools open through workers/ipc.py)")
    return KVPool.open_shared(layout, info.shm_name)


class WorkerShell:
    def __init__(self, args: WorkerArgs) -> None:
        import zmq

        from tetri.control.load_board import LoadBoard
        from tetri.workers.executor import Executor

        self.args = args
        self.role = args.role
        self.stop = False
        self.board = LoadBoard.attach(args.board_name, args.num_workers)
        self._write_board("starting")
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(args.endpoint)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.connect(args.front_endpoint)
        self.ex = Executor(args.model, args.cache, shared_pool=args.model.device.startswith("cpu"),
                           memory_share=args.memory_share)
        self.peer_infos: dict[int, PoolInfo] = {}
        self.core = self._make_core(self.role)
        self._last_board = 0.0

    def _make_core(self, role: str):
        a = self.args
        if role == "prefill":
            from tetri.workers.prefill import PrefillCore

            return PrefillCore(self.ex, a.worker_id, collect_hidden=a.collect_hidden)
        if role == "decode":
            from tetri.sched.decode_policy import make_decode_policy
            from tetri.workers.decode import DecodeCore

            core = DecodeCore(self.ex, a.worker_id, make_decode_policy(a.sched.decode_policy), a.sched.max_num_seqs)
            for wid, info in self.peer_infos.items():
                if wid != a.worker_id:
                    core.add_peer(wid, open_pool(info))
            return core
        from tetri.workers.mixed import MixedCore

        return MixedCore(self.ex, a.sched)

    # ---- messages --------------------------------------------------------------------
    def send(self, msg) -> None:
        self.push.send(encode(msg))

    def handle(self, raw: bytes) -> None:
        try:
            msg = to_worker_decoder.decode(raw)
        except msgspec.DecodeError as e:
            log.warning("worker %d dropped a malformed message: %s", self.args.worker_id, e)
            return
        core = self.core
        match msg:
            case ChunkPlan() if self.role == "prefill":
                core.submit(msg)
            case Handoff() if self.role == "decode":
                core.handoff(msg, time.monotonic())
            case Release() if self.role == "prefill":
                core.release(msg.req_id)
            case Abort():
                self._abort(msg)
            case SubmitMixed() if self.role == "mixed":
                try:
                    core.add_request(msg.req_id, msg.prompt_token_ids, msg.params, msg.arrival_s)
                except ValueError as e:
                    self.send(WorkerError(worker_id=self.args.worker_id, message=str(e), req_id=msg.req_id))
            case PeerPools():
                self._peers(msg)
            case SetRole():
                self._set_role(msg.role)
            case Shutdown():
                self.stop = True
            case _:
                log.warning("worker %d (%s) dropped unexpected %s", self.args.worker_id, self.role, type(msg).__name__)

    def _abort(self, msg: Abort) -> None:
        if self.role == "prefill":
            self.core.abort(msg.req_id)
        elif self.role == "decode":
            self.core.abort(msg.req_id, msg.choice)
            if msg.choice is None:
                self.send(Dropped(worker_id=self.args.worker_id, req_id=msg.req_id))
        elif msg.choice is None:
            self.core.abort(msg.req_id)
        else:
            self.core.abort_choice(msg.req_id, msg.choice)

    def _peers(self, msg: PeerPools) -> None:
        self.peer_infos = dict(msg.pools)
        if self.role == "decode":
            for wid, info in msg.pools.items():
                if wid != self.args.worker_id and wid not in self.core.peers:
                    self.core.add_peer(wid, open_pool(info))

    def _set_role(self, role: str) -> None:
        """Instance flip: same process, same weights and pool; only the role core changes.
        The front drains the worker first, so the old core holds nothing."""
        if role == self.role:
            return
        if self.core.has_work() or self.ex.blocks.num_used:
            log.warning("worker %d asked to flip while busy; ignored", self.args.worker_id)
            return
        self.role = role
        self.core = self._make_core(role)

    # ---- the loop ----------------------------------------------------------------------
    def _write_board(self, state: str) -> None:
        a = self.args
        core = getattr(self, "core", None)
        blocks = getattr(getattr(self, "ex", None), "blocks", None)
        extra = {}
        if core is not None:
            if self.role == "decode":
                extra = core.load()
            elif self.role == "prefill":
                extra = dict(queued_prefill_tokens=core.queued_tokens, running_reqs=core.num_prefilling,
                             waiting_reqs=len(core.done))
            else:
                extra = dict(queued_prefill_tokens=core.packer.queued_tokens, running_reqs=len(core.running),
                             waiting_reqs=core.num_waiting)
        self.board.write(a.worker_id, role=self.role, state=state, pid=os.getpid(),
                         free_blocks=blocks.num_free if blocks else 0, total_blocks=blocks.num_blocks if blocks else 0,
                         block_size=a.cache.block_size, restarts=a.restarts, **extra)
        self._last_board = time.monotonic()

    def step_once(self) -> None:
        if self.role == "prefill":
            done = self.core.step()
            if done is not None:
                self.send(done)
        elif self.role == "decode":
            batch, acks = self.core.step(time.monotonic())
            for ack in acks:
                self.send(ack)
            if batch is not None:
                self.send(batch)
        else:
            sampled = self.core.step()
            if sampled:
                self.send(_token_batch(self.args.worker_id, sampled))

    def run(self) -> None:
        import zmq

        a = self.args
        self.send(Ready(worker_id=a.worker_id, pid=os.getpid(), role=self.role, device=a.model.device,
                        pool=pool_info(self.ex.pool), max_model_len=self.ex.max_model_len,
                        eos_token_ids=list(self.ex.eos_token_ids)))
        self._write_board("ready")
        while not self.stop:
            timeout_ms = 0 if self.core.has_work() else int(HEARTBEAT_S * 1000 / 2)
            if self.pull.poll(timeout_ms):
                while True:
                    try:
                        self.handle(self.pull.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.stop or os.getppid() != a.parent_pid:
                break
            if self.core.has_work():
                self.step_once()
                self._write_board("ready")
            elif time.monotonic() - self._last_board > HEARTBEAT_S:
                self._write_board("ready")

    def close(self) -> None:
        for sock in (self.pull, self.push):
            sock.close(linger=500)
        self.ctx.term()
        self.ex.close()
        self.board.close()


def _token_batch(worker_id: int, sampled) -> TokenBatch:
    batch = TokenBatch(worker_id=worker_id, req_ids=[], choices=[], token_ids=[], finish_reasons=[], logprobs=[])
    for st in sampled:
        seq = st.seq
        batch.req_ids.append(seq.req_id)
        batch.choices.append(seq.choice)
        batch.token_ids.append(st.token)
        batch.finish_reasons.append(seq.finish_reason.value if st.finished else None)
        batch.logprobs.append(seq.logprobs[-1] if seq.params.logprobs is not None else None)
    return batch


def worker_main(args: WorkerArgs) -> None:
    """Spawn target. Exits 0 on a clean stop, 1 after a fatal error."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{args.worker_id} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front handles Ctrl-C and tells us
    import torch

    torch.set_num_threads(max(1, args.threads))
    shell = None
    try:
        shell = WorkerShell(args)
        signal.signal(signal.SIGTERM, lambda *_: setattr(shell, "stop", True))
        shell.run()
    except Exception as e:  # fatal: report and exit non-zero
        log.error("worker %d failed: %s", args.worker_id, traceback.format_exc())
        if shell is not None:
            try:
                shell.send(WorkerError(worker_id=args.worker_id, message=f"{type(e).__name__}: {e}"))
            except Exception:
                pass
        raise SystemExit(1)
    finally:
        if shell is not None:
            shell.close()
