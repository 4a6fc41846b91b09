"""Worker processes: spawn (never fork), liveness, and a teardown that leaves nothing behind.

The asyncio side (READY handshake, supervision loop, message routing) lives in
`tetri.server.engine_client`; this module only owns processes and the private directory
holding the ZeroMQ ipc:// sockets (mode 0700).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.workers.cuda_ipc import forced_alloc_conf
from tetri.workers.proc import WorkerArgs, error_path, worker_main


RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0


def restart_delay_s(restarts: int) -> float:
    """Back-off before restarting a worker that already restarted `restarts` times:
    1, 2, 4, 8, 16, then 30 s for every later one."""
    return min(RESTART_MAX_S, RESTART_FIRST_S * 2.0 ** min(max(0, restarts), 32))


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # prefill | decode | mixed
    device: str = "cpu"
    memory_share: float = 1.0
    """Share of the device's memory budget (workers sharing one GPU split it)."""


@dataclass(frozen=True)
class LaunchConfig:
    workers: tuple[WorkerSpec, ...]
    threads_per_worker: int = 1
    omp_passive: bool = False
    """Workers' idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, in
    the child's environment, so it holds before torch loads): for threads that share cores."""
    ready_timeout_s: float = 180.0
    heartbeat_timeout_s: float = 30.0
    """A live process whose board row is older than this is declared hung (steps can be long on CPU)."""
    collect_hidden: bool = False

    def __post_init__(self) -> None:
        if not self.workers:
            raise ValueError("need at least one worker")
        roles = {w.role for w in self.workers}
        if "mixed" in roles and roles != {"mixed"}:
            raise ValueError("colocated (mixed) workers cannot be combined with prefill/decode workers")
        if roles & {"prefill", "decode"} and not {"prefill", "decode"} <= roles:
            raise ValueError("disaggregated mode needs at least one prefill and one decode worker")


@contextlib.contextmanager
def _child_env(extra: dict[str, str]):
    """Set `extra` (where not already set by the user) for the processes started inside."""
    added = {k: v for k, v in extra.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@dataclass
class WorkerProcs:
    model: ModelConfig
    cache: CacheConfig
    sched: EngineSchedConfig
    launch: LaunchConfig
    board_name: str
    ipc_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="tetri-ipc-"))
    procs: dict[int, mp.Process] = field(default_factory=dict)
    restarts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        os.chmod(self.ipc_dir, 0o700)
        self._ctx = mp.get_context("spawn")

    @property
    def front_endpoint(self) -> str:
        return f"ipc://{self.ipc_dir}/front.sock"

    def endpoint(self, worker_id: int) -> str:
        return f"ipc://{self.ipc_dir}/w{worker_id}.sock"

    def spawn(self, worker_id: int, role: str | None = None) -> mp.Process:
        spec = self.launch.workers[worker_id]
        model = dataclasses.replace(self.model, device=spec.device)
        args = WorkerArgs(worker_id=worker_id, role=role or spec.role, model=model, cache=self.cache,
                          sched=self.sched, ipc_dir=self.ipc_dir, board_name=self.board_name,
                          num_workers=len(self.launch.workers), parent_pid=os.getpid(),
                          memory_share=spec.memory_share, threads=self.launch.threads_per_worker,
                          collect_hidden=self.launch.collect_hidden, restarts=self.restarts.get(worker_id, 0))
        proc = self._ctx.Process(target=worker_main, args=(args,), name=f"tetri-worker-{worker_id}", daemon=True)
        # A spawned process inherits this environment: expandable segments stay off in the worker
        # from before torch is imported there (CUDA IPC cannot export them; the front uses no CUDA).
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = forced_alloc_conf(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(error_path(self.ipc_dir, worker_id))  # a reason left by an earlier life is not this one's
        with _child_env({"OMP_WAIT_POLICY": "PASSIVE"} if self.launch.omp_passive else {}):
            proc.start()  # a spawned child starts from this environment
        self.procs[worker_id] = proc
        return proc

    def spawn_all(self) -> None:
        for i in range(len(self.launch.workers)):
            self.spawn(i)

    def alive(self, worker_id: int) -> bool:
        proc = self.procs.get(worker_id)
        return proc is not None and proc.is_alive()

    def last_error(self, worker_id: int) -> str:
        """Why the worker's process ended: the fatal error it recorded, else its exit status."""
        try:
            with open(error_path(self.ipc_dir, worker_id)) as f:
                text = f.read().strip()
            if text:
                return text
        except OSError:
            pass
        proc = self.procs.get(worker_id)
        code = proc.exitcode if proc is not None else None
        if code is None:
            return "no exit status"
        return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def pid(self, worker_id: int) -> int | None:
        proc = self.procs.get(worker_id)
        return proc.pid if proc is not None else None

    def kill(self, worker_id: int) -> mp.Process | None:
        """SIGKILL the worker; returns its process for the caller to reap (`join`) off the
        event loop, or None when it had already exited."""
        proc = self.procs.get(worker_id)
        if proc is None or not proc.is_alive():
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        return proc

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Wait for workers told to shut down; terminate, then kill, the stragglers."""
        for proc in self.procs.values():
            proc.join(timeout_s / max(1, len(self.procs)))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)

    def remove_ipc_dir(self) -> None:
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
