"""Moving KV blocks from a peer's pool into ours: one interface, one implementation per path.

A `PeerSource` is a peer pool opened once for copying out of: a *mapping* (where the peer's
blocks can be read from this process) composed with a *copier* (how a copy runs on this
worker's device). The path is chosen per peer pair when `PeerPools` arrives (`open_peer`), in
this order of preference, skipping those that do not apply and falling back past those that fail:

    local         the pool is this process's own: the tensor itself (no IPC open in the owner)
    cuda_ipc      same GPU, another process: the pool's CUDA IPC handle, opened once (cuda_ipc.py)
    cuda_ipc_p2p  another GPU with peer access (torch's can_device_access_peer, then a real probe
                  copy of the canary through the mapping)
    shm           CPU pools: the shared-memory segment opened by name (the CPU path)
    host_staged   the owner's shared-memory mirror (kv_stage.py): the owner copies finished
                  prompts there, we copy from there (pinned on CUDA); works wherever the host does
    none          nothing opened: handoffs on this pair fail at once with the reasons

Every open checks the owner's canary (the 64 bytes at the end of its pool) before trusting the
mapping; a mismatch is refused with the reason and the next path is tried, with a warning.
`TETRI_KV_TRANSFER=path,path` restricts the choice (e.g. `host_staged` to measure the fallback);
`local` is always allowed.

Copies: the `SyncCopier` (CPU) copies at once; the `StreamCopier` (CUDA) issues one `copy_`
per run of consecutive block ids on a dedicated stream, after the work already queued on this
worker's stream, and records an event. A copy's `Completion` is what `InflightCopies` keeps:
the decode worker acks `KVCopied` only once the host has seen the event complete, and frees the
destination blocks of an aborted or dropped copy only after it completed. The producer's compute
is finished before any copy starts: a prefill worker reports a prompt only after sampling its
first token on the host (which waits for the forward that wrote the KV).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tetri.protocol import PoolInfo
from tetri.workers.kv_pool import CANARY_BYTES, KVPool, PoolLayout, _canary_elems, _itemsize, copy_runs

log = logging.getLogger("tetri.kv")
PATHS = ("local", "cuda_ipc", "cuda_ipc_p2p", "shm", "host_staged")


class PeerOpenError(RuntimeError):
    """A path could not be opened (or its canary did not match): the next path is tried."""


# ---- completions and copiers -------------------------------------------------------------


class Done:
    """A copy that finished before it was returned (CPU copies)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class EventDone:
    """A copy queued on a CUDA stream: done once its event has completed as seen from the host."""

    def __init__(self, event) -> None:
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class SyncCopier:
    def copy(self, dst: torch.Tensor, src: torch.Tensor, src_ids: list[int], dst_ids: list[int]):
        copy_runs(dst, src, src_ids, dst_ids)
        return Done()


class StreamCopier:
    """Copies on a dedicated stream of this worker's GPU, ordered after the work already queued on
    its current stream (earlier writers of the destination blocks)."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, src_ids: list[int], dst_ids: list[int]):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copy_runs(dst, src, src_ids, dst_ids)
            event = torch.cuda.Event()
            event.record(self.stream)
        return EventDone(event)


def make_copier(device: str):
    return StreamCopier(device) if device.startswith("cuda") else SyncCopier()


# ---- sources ---------------------------------------------------------------------------


@dataclass
class PeerSource:
    path: str
    src: torch.Tensor | None  # [num_blocks, ...] view of the peer's blocks, readable here
    copier: object = None
    block_bytes: int = 0
    close_fn: Callable[[], None] | None = None
    ready_fn: Callable[[list[int], int], bool] | None = None  # host_staged: the owner staged these blocks
    error: str | None = None  # why better paths were not taken (or, for `none`, why nothing opened)

    def ready(self, src_ids: list[int], stamp: int) -> bool:
        return self.ready_fn is None or self.ready_fn(src_ids, stamp)

    def copy_into(self, dst_pool: KVPool, src_ids: list[int], dst_ids: list[int]):
        if self.src is None:
            raise PeerOpenError(f"no transfer path: {self.error}")
        return self.copier.copy(dst_pool.data, self.src, src_ids, dst_ids)

    def close(self) -> None:
        self.src = None
        fn, self.close_fn = self.close_fn, None
        if fn is not None:
            fn()


def as_source(pool_or_source, device: str | None = None) -> PeerSource:
    """A `PeerSource` as is, or a pool of this process (in-process clusters) used directly."""
    if isinstance(pool_or_source, PeerSource):
        return pool_or_source
    pool = pool_or_source
    return PeerSource("local", pool.data, make_copier(device or str(pool.data.device)), pool.layout.block_bytes)


# ---- choosing a path -------------------------------------------------------------------


@dataclass(frozen=True)
class LocalEnd:
    """The opening worker: its id (its flag in staging mirrors) and its pool's device."""

    worker_id: int
    device: str = "cpu"


@dataclass(frozen=True)
class PeerFacts:
    same_process: bool = False
    cuda_here: bool = False
    peer_gpu: int | None = None  # local index of the owner's GPU (found by UUID), None if not visible
    same_gpu: bool = False
    peer_access: bool = False


def candidate_paths(info: PoolInfo, facts: PeerFacts, allowed: tuple[str, ...] = PATHS) -> tuple[list[str], list[str]]:
    """(paths to try in order, reasons a better path does not apply). Pure."""
    paths, reasons = [], []
    if facts.same_process:
        paths.append("local")
    if info.cuda_ipc:
        if not facts.cuda_here:
            reasons.append("cuda_ipc: this worker has no GPU")
        elif facts.peer_gpu is None:
            reasons.append(f"cuda_ipc: the owner's GPU ({info.device_uuid.hex()}) is not visible here")
        elif facts.same_gpu:
            paths.append("cuda_ipc")
        elif facts.peer_access:
            paths.append("cuda_ipc_p2p")
        else:
            reasons.append(f"cuda_ipc_p2p: no peer access to the owner's GPU (local index {facts.peer_gpu})")
    elif info.export_error:
        reasons.append(f"cuda_ipc: the owner exported no handle ({info.export_error})")
    if info.shm_name:
        paths.append("shm")
    if info.stage_shm:
        paths.append("host_staged")
    kept = [p for p in paths if p == "local" or p in allowed]
    reasons += [f"{p}: excluded by TETRI_KV_TRANSFER" for p in paths if p not in kept]
    return kept, reasons


def allowed_paths() -> tuple[str, ...]:
    env = os.environ.get("TETRI_KV_TRANSFER", "").strip()
    return tuple(p.strip() for p in env.split(",") if p.strip()) if env else PATHS


def layout_of(info: PoolInfo) -> PoolLayout:
    return PoolLayout(info.num_blocks, info.num_layers, info.block_size, info.num_kv_heads, info.head_dim, info.dtype)


def probe_facts(info: PoolInfo, end: LocalEnd) -> PeerFacts:
    same_process = info.owner_pid == os.getpid() and KVPool.local(info.canary) is not None
    cuda_here = end.device.startswith("cuda")
    if not (cuda_here and info.device_uuid):
        return PeerFacts(same_process, cuda_here)
    from tetri.workers.kv_pool import device_uuid

    mine = torch.device(end.device).index or 0
    peer = next((i for i in range(torch.cuda.device_count()) if device_uuid(i) == info.device_uuid), None)
    access = peer is not None and peer != mine and torch.cuda.can_device_access_peer(mine, peer)
    return PeerFacts(same_process, True, peer, peer == mine, access)


def open_peer(info: PoolInfo, end: LocalEnd, allowed: tuple[str, ...] | None = None) -> PeerSource:
    """Open the best path to a peer's pool; never raises (a pair with no path is `none`)."""
    try:
        facts, probe_error = probe_facts(info, end), None
    except Exception as e:  # e.g. a CUDA query failing: the host path still works
        facts, probe_error = PeerFacts(cuda_here=False), f"GPU probe failed: {e}"
    paths, reasons = candidate_paths(info, facts, allowed or allowed_paths())
    reasons = [probe_error, *reasons] if probe_error else reasons
    for path in paths:
        try:
            source = _OPENERS[path](info, end)
        except Exception as e:  # any failure to open is a reason to fall back, never a crash loop
            reasons.append(f"{path}: {e}")
            log.warning("worker %d: KV path %s to the pool of pid %d failed: %s", end.worker_id, path, info.owner_pid, e)
            continue
        source.error = "; ".join(reasons) or None
        if path == "host_staged" or any("excluded by" not in r for r in reasons):
            log.warning("worker %d: KV from pid %d takes the %s path (%s)", end.worker_id, info.owner_pid, path,
                        source.error or "no direct path offered")
        return source
    why = "; ".join(reasons) or "the pool offers no path"
    log.error("worker %d: no KV transfer path to the pool of pid %d: %s", end.worker_id, info.owner_pid, why)
    return PeerSource("none", None, error=why)


def _check_canary(tail: bytes, info: PoolInfo, where: str) -> None:
    want = info.canary * (CANARY_BYTES // 16) if info.canary else b""
    if not want or tail != want:
        raise PeerOpenError(f"canary mismatch in {where}: the memory is not the pool its owner (pid {info.owner_pid}) "
                            f"described (found {tail[:8].hex()}..., expected {want[:8].hex()}...)")


def _open_local(info: PoolInfo, end: LocalEnd) -> PeerSource:
    pool = KVPool.local(info.canary)
    if pool is None:
        raise PeerOpenError("not this process's pool")
    return as_source(pool, end.device)


def _open_shm(info: PoolInfo, end: LocalEnd) -> PeerSource:
    pool = KVPool.open_shared(layout_of(info), info.shm_name)
    try:
        _check_canary(pool.canary_tail(), info, f"segment {info.shm_name}")
    except PeerOpenError:
        pool.close()
        raise
    return PeerSource("shm", pool.data, make_copier(end.device), pool.layout.block_bytes, close_fn=pool.close)


def _open_cuda_ipc(info: PoolInfo, end: LocalEnd, path: str = "cuda_ipc") -> PeerSource:
    from tetri.workers import cuda_ipc

    layout = layout_of(info)
    total = layout.nbytes + _canary_elems(layout) * _itemsize(layout)
    if info.ipc_offset + total > info.ipc_size or len(info.cuda_ipc or b"") != 64:
        raise PeerOpenError(f"the export does not hold the pool ({info.ipc_offset} + {total} bytes in an allocation "
                            f"of {info.ipc_size})")
    with torch.cuda.device(torch.device(end.device)):
        try:
            base = cuda_ipc.open_handle(info.cuda_ipc)
        except cuda_ipc.CudaIpcError as e:
            raise PeerOpenError(str(e)) from e
        try:
            whole = cuda_ipc.device_bytes(base + info.ipc_offset, total)
            tail = whole[-CANARY_BYTES:].to(end.device).cpu()  # a real copy through the mapping (the P2P probe)
            _check_canary(bytes(tail.numpy().tobytes()), info, "the CUDA IPC mapping")
        except Exception:
            cuda_ipc.close_handle(info.cuda_ipc)
            raise
    src = whole[: layout.nbytes].view(layout.torch_dtype).view(layout.shape)
    return PeerSource(path, src, make_copier(end.device), layout.block_bytes,
                      close_fn=lambda: cuda_ipc.close_handle(info.cuda_ipc))


def _open_staged(info: PoolInfo, end: LocalEnd) -> PeerSource:
    from tetri.workers.kv_stage import StagedMapping

    layout = layout_of(info)
    mapping = StagedMapping.open(info.stage_shm, layout, info.canary, end.worker_id)
    if end.device.startswith("cuda"):
        mapping.mirror.pin()
    return PeerSource("host_staged", mapping.data, make_copier(end.device), layout.block_bytes,
                      close_fn=mapping.close, ready_fn=mapping.ready)


_OPENERS = {"local": _open_local, "shm": _open_shm, "cuda_ipc": _open_cuda_ipc,
            "cuda_ipc_p2p": lambda info, end: _open_cuda_ipc(info, end, "cuda_ipc_p2p"), "host_staged": _open_staged}


# ---- copies in flight ------------------------------------------------------------------


@dataclass
class InflightCopy:
    req_id: str
    src_worker: int
    seqs: list  # the sequences whose destination blocks the copies write
    completions: list
    num_bytes: int
    path: str
    start_s: float = field(default_factory=time.perf_counter)

    def done(self) -> bool:
        return all(c.done() for c in self.completions)

    def wait(self) -> None:
        for c in self.completions:
            c.wait()


class InflightCopies:
    """Copies started and not yet acked, by request. Nothing here is freed: `settle*` wait for a
    copy's completion and hand it back for the caller to free."""

    def __init__(self) -> None:
        self._by_req: dict[str, InflightCopy] = {}

    def __len__(self) -> int:
        return len(self._by_req)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._by_req

    def add(self, copy: InflightCopy) -> None:
        self._by_req[copy.req_id] = copy

    def landed(self) -> list[InflightCopy]:
        """Remove and return the copies the host has seen complete (in start order)."""
        done = [c for c in self._by_req.values() if c.done()]
        for c in done:
            del self._by_req[c.req_id]
        return done

    def wait_oldest(self) -> None:
        if self._by_req:
            next(iter(self._by_req.values())).wait()

    def settle(self, req_id: str) -> InflightCopy | None:
        """Wait for the request's copy to complete and remove it."""
        copy = self._by_req.pop(req_id, None)
        if copy is not None:
            copy.wait()
        return copy

    def settle_from(self, src_worker: int) -> list[InflightCopy]:
        return [self.settle(r) for r, c in list(self._by_req.items()) if c.src_worker == src_worker]
