"""The host-staged KV path: a shared-memory mirror of a pool, for peers that cannot map the pool.

The fallback wherever the direct path is not available: a CUDA IPC open that failed (a handle
that does not open, a canary that does not match, no CUDA IPC export), GPUs without peer access,
or a CPU segment whose canary is wrong. The owner of every shared pool creates the mirror at
start (sparse: it costs no memory until used); a peer that selects this path sets its flag in the
mirror's header, and from then on the owner copies each finished prompt's blocks into the mirror
(at the same block ids) before it reports them, and stamps them with the request's stamp. The
peer copies only blocks whose stamps match the request it is taking over (else it retries), so it
never reads a stale or half-written block.

    header: magic (8) | canary nonce (16) | pad | want flags u8[256] (by peer worker id)
            | stamps int64[num_blocks]
    data:   [num_blocks, ...] block-major, like the pool (at a 4 KiB-aligned offset)

Memory: the segment is sparse; a block costs host memory once it was first staged, and the
allocator hands out low block ids first, so what is resident follows the most blocks the owner
ever held at once. Before staging blocks not yet resident the owner checks that /dev/shm has the
room (a write past a full tmpfs would kill it with SIGBUS); without room it stages nothing and
says so (that handoff then ends at the front's handoff deadline). On CUDA both ends page-lock
(cuMemHostRegister) the first TETRI_KV_STAGE_PIN_GB (default 4) GiB of the mirror the first time
a peer wants it, so copies of the low block ids are asynchronous; the rest stays pageable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from multiprocessing import shared_memory

import numpy as np
import torch

from tetri.workers.kv_pool import PoolLayout, copy_runs

log = logging.getLogger("tetri.kv")
MAGIC = b"TETRISTG"
MAX_PEERS = 256
_WANT_AT, _STAMPS_AT = 64, 64 + MAX_PEERS


def stamp_of(req_id: str, prompt_tokens: int) -> int:
    """The stamp of a request's staged blocks (a migrated request re-prefills with a longer prompt,
    so its stamp differs from its earlier life's)."""
    h = hashlib.blake2b(f"{req_id}\0{prompt_tokens}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF) | 1


def block_stamps(req_id: str, prompt_ids: list[int], block_size: int, seed: bytes, caching: bool) -> list[int]:
    """The stamp of each of a prompt's blocks. With prefix caching a full block may be shared by
    several requests (staged by each with identical content), so it is stamped with its prefix
    hash, which names its content; the partial last block (never shared) with `stamp_of`."""
    from tetri.sched.prefix_hash import block_hashes

    n = -(-len(prompt_ids) // block_size)
    own = stamp_of(req_id, len(prompt_ids))
    if not caching:
        return [own] * n
    full = [(int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF) | 1
            for h in block_hashes(prompt_ids, block_size, seed)]
    return full + [own] * (n - len(full))


def _stamps_of(ex, req_id: str, prompt_ids: list[int]) -> list[int]:
    return block_stamps(req_id, prompt_ids, ex.block_size, ex.hash_seed, ex.blocks.caching)


def _data_offset(num_blocks: int) -> int:
    return -(-(_STAMPS_AT + 8 * num_blocks) // 4096) * 4096


def mirror_bytes(layout: PoolLayout) -> int:
    return _data_offset(layout.num_blocks) + layout.nbytes


class _Mirror:
    """Views over one mapping of a mirror segment (owner or peer)."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: PoolLayout) -> None:
        self.shm = shm
        self.layout = layout
        buf = shm.buf
        self.want = np.ndarray((MAX_PEERS,), np.uint8, buffer=buf, offset=_WANT_AT)
        self.stamps = np.ndarray((layout.num_blocks,), np.int64, buffer=buf, offset=_STAMPS_AT)
        count = layout.nbytes // torch.empty((), dtype=layout.torch_dtype).element_size()
        self.data = torch.frombuffer(buf, dtype=layout.torch_dtype, count=count,
                                     offset=_data_offset(layout.num_blocks)).view(layout.shape)
        self.pinned_ptr: int | None = None

    def nonce(self) -> bytes:
        return bytes(self.shm.buf[8:24])

    def pin(self) -> None:
        """Page-lock the start of the data region (both ends do it: the same pages)."""
        if self.pinned_ptr is not None or not torch.cuda.is_available():
            return
        cap = float(os.environ.get("TETRI_KV_STAGE_PIN_GB", "4")) * 2**30
        block = self.layout.block_bytes
        nbytes = min(self.layout.nbytes, int(cap) // block * block)
        if nbytes <= 0 or shm_free_bytes() < nbytes:
            log.warning("KV staging mirror %s left pageable (no room in /dev/shm to lock %.1f GiB): slower copies",
                        self.shm.name, nbytes / 2**30)
            return
        from tetri.workers import cuda_ipc

        try:
            cuda_ipc.host_register(self.data.data_ptr(), nbytes)
            self.pinned_ptr = self.data.data_ptr()
        except cuda_ipc.CudaIpcError as e:
            log.warning("KV staging mirror %s not page-locked: %s", self.shm.name, e)

    def close(self) -> None:
        if self.pinned_ptr is not None:
            from tetri.workers import cuda_ipc

            try:
                cuda_ipc.host_unregister(self.pinned_ptr)
            except cuda_ipc.CudaIpcError as e:
                log.warning("could not unregister %s: %s", self.shm.name, e)
            self.pinned_ptr = None
        self.want = self.stamps = None
        self.data = torch.empty(0)
        try:
            self.shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the OS unmaps at exit


class StageOpenError(RuntimeError):
    """The mirror did not open (or is not the one its owner described): the path is not taken."""


def shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


class HostStage:
    """The owner's side: creates the mirror, stages blocks when a peer wants them."""

    ROOM_MARGIN = 64 << 20

    def __init__(self, mirror: _Mirror) -> None:
        self.mirror = mirror
        self.served: frozenset[int] = frozenset()  # peers whose backlog was staged
        self.live: frozenset[int] | None = None  # the peers in the last PeerPools (None: not told yet)
        self.resident = np.zeros(mirror.layout.num_blocks, dtype=bool)  # blocks written at least once

    @property
    def name(self) -> str:
        return self.mirror.shm.name

    @classmethod
    def create(cls, layout: PoolLayout, nonce: bytes) -> HostStage | None:
        """A sparse segment (nothing resident but its header); None where it cannot be created."""
        try:
            shm = shared_memory.SharedMemory(name=f"tetri-kvstage-{secrets.token_hex(8)}", create=True,
                                             size=mirror_bytes(layout))
        except OSError as e:
            log.warning("no host-staged KV fallback for this pool: %s", e)
            return None
        shm.buf[0:8] = MAGIC
        shm.buf[8:24] = nonce
        return cls(_Mirror(shm, layout))

    def wanted_by(self) -> frozenset[int]:
        """The live peers whose flag is set: a peer that died keeps its flag (it never cleared it),
        so only those in the front's last PeerPools count (a restarted one is back in the next)."""
        flags = frozenset(int(i) for i in np.flatnonzero(self.mirror.want))
        return flags if self.live is None else flags & self.live

    def put(self, pool_data: torch.Tensor, block_ids: list[int], stamp) -> bool:
        """Copy these pool blocks into the mirror (synchronously: done when this returns) and
        stamp them; False (and nothing written) when /dev/shm has no room for them. A block the
        mirror already holds under the same stamp is left as it is: a stamp names its content
        (a prefix hash, or one request's own prompt), so a cached prefix staged for an earlier
        request is not copied again."""
        m = self.mirror
        ids = np.asarray(block_ids, dtype=np.int64)
        stamps = np.broadcast_to(np.asarray(stamp, dtype=np.int64), ids.shape)
        stale = m.stamps[ids] != stamps
        ids, stamp = ids[stale], stamps[stale]
        block_ids = ids.tolist()
        if not block_ids:
            return True
        if pool_data.is_cuda:
            m.pin()
        new_bytes = int((~self.resident[ids]).sum()) * m.layout.block_bytes
        if new_bytes and shm_free_bytes() < new_bytes + self.ROOM_MARGIN:
            log.error("KV staging mirror %s: no room in /dev/shm for %d MB more; blocks not staged",
                      self.name, new_bytes >> 20)
            return False
        self.resident[ids] = True
        m.stamps[ids] = 0  # invalidate first: a reader never sees new stamps over old data
        copy_runs(m.data, pool_data, block_ids, block_ids)
        if pool_data.is_cuda:
            torch.cuda.current_stream(pool_data.device).synchronize()
        m.stamps[ids] = np.asarray(stamp, dtype=np.int64)  # one stamp, or one per block
        return True

    def close(self) -> None:
        shm = self.mirror.shm
        self.mirror.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class StagedMapping:
    """A peer's side: the mirror opened by name, its flag set while open."""

    def __init__(self, mirror: _Mirror, peer_id: int) -> None:
        self.mirror = mirror
        self.peer_id = peer_id

    @property
    def data(self) -> torch.Tensor:
        return self.mirror.data

    @classmethod
    def open(cls, name: str, layout: PoolLayout, nonce: bytes, peer_id: int) -> StagedMapping:
        if not 0 <= peer_id < MAX_PEERS:
            raise StageOpenError(f"worker id {peer_id} has no flag in a staging mirror (at most {MAX_PEERS})")
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except OSError as e:
            raise StageOpenError(f"staging mirror {name} does not open: {e}") from e
        if shm.size < mirror_bytes(layout) or bytes(shm.buf[0:8]) != MAGIC or bytes(shm.buf[8:24]) != nonce:
            shm.close()
            raise StageOpenError(f"staging mirror {name} is not the one its owner described (size or canary differs)")
        mirror = _Mirror(shm, layout)
        mirror.want[peer_id] = 1
        return cls(mirror, peer_id)

    def ready(self, block_ids: list[int], stamp) -> bool:
        """Whether the owner staged exactly these blocks for this request (one stamp, or one per block)."""
        return bool(np.all(self.mirror.stamps[np.asarray(block_ids, dtype=np.int64)] == np.asarray(stamp)))

    def close(self) -> None:
        if self.mirror.want is not None:
            self.mirror.want[self.peer_id] = 0
        self.mirror.close()


def with_stage(pool):
    """Give a shared pool (this process owns it) its host-staging mirror; returns the pool.
    The pool closes the mirror with itself (`KVPool.close`)."""
    pool.stage = HostStage.create(pool.layout, pool.nonce)
    return pool


# ---- the owner's hooks (a prefill worker; called by workers/node.py) ----------------------


def stage_finished(ex, core, chunk_done) -> None:
    """Stage the prompts a chunk finished, before they are reported, if any peer wants staging;
    a peer that asked since the last time also gets the prompts already held (the backlog)."""
    stage = ex.pool.stage
    if stage is None:
        return
    wanted = stage.wanted_by()
    if not wanted <= stage.served:
        stage_backlog(ex, core)
        return  # the backlog includes this chunk's prompts
    stage.served = wanted  # peers that stopped wanting drop out (and get a backlog if they come back)
    if not wanted:
        return
    for res in chunk_done.finished:
        stage.put(ex.pool.data, res.block_ids, _stamps_of(ex, res.req_id, core.seqs[res.req_id][0].prompt_ids))


def stage_backlog(ex, core) -> None:
    """Stage every prompt this worker holds (prefilled, awaiting a copy) for the peers that want it."""
    stage = ex.pool.stage
    if stage is None:
        return
    wanted = stage.wanted_by()
    if wanted <= stage.served:
        stage.served = wanted
        return
    for req_id in list(core.done):
        head = core.seqs[req_id][0]
        stage.put(ex.pool.data, list(ex.blocks.blocks_of(head.key)), _stamps_of(ex, req_id, head.prompt_ids))
    stage.served = wanted
    log.info("KV staging on for peers %s: %d held prompts staged", sorted(wanted), len(core.done))
