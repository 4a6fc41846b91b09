"""The paged KV pool: one tensor allocated once per worker, block-major.

    data: [num_blocks, num_layers, 2 (k|v), block_size, num_kv_heads, head_dim]

A block holds every layer's K and V for `block_size` tokens in one contiguous span, so moving
a request to another pool is one `copy_` per run of consecutive block ids (few, large
copies). The allocation holds one more block past `data`: the canary block, never handed out
by the allocator, whose last 64 bytes are the pool's random 16-byte nonce four times; a peer
that opens the pool checks them before trusting the mapping.

Where it lives: on CPU in a named shared-memory segment that peers open by name; on CUDA in
ordinary device memory (one `torch.zeros`, never freed) that peers open through a CUDA IPC
handle (`workers/cuda_ipc.py`). A shared pool also gets a host-staging mirror
(`workers/kv_stage.py`) for peers that cannot map it. `PoolInfo` (protocol.py) is how peers
learn all of it (`node.pool_info`); `workers/kv_transfer.py` opens and copies. Accounting
(which ids are free) is `tetri.sched.kv_blocks.BlockAllocator`; this module only owns memory.
"""

from __future__ import annotations

import logging
import math
import secrets
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from tetri.workers.models.llama import ArchSpec

log = logging.getLogger("tetri.kv")
CANARY_BYTES = 64
LAYOUT = "blocks,layers,kv,tokens,heads,dim"  # row-major and contiguous
_LOCAL: weakref.WeakValueDictionary[bytes, KVPool] = weakref.WeakValueDictionary()  # nonce -> pool of this process


@dataclass(frozen=True)
class PoolLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.shape[1:]) * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.num_blocks

    @staticmethod
    def for_model(spec: ArchSpec, num_blocks: int, block_size: int, dtype: torch.dtype) -> PoolLayout:
        return PoolLayout(num_blocks, spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim,
                          str(dtype).removeprefix("torch."))


def blocks_for_budget(layout_one_block: PoolLayout, budget_bytes: float) -> int:
    return max(1, int(budget_bytes // layout_one_block.block_bytes))


class KVPool:
    """Owns (or has opened) one worker's pool. Create with `allocate`, peers use `open_shared`."""

    def __init__(self, layout: PoolLayout, data: torch.Tensor, shm: shared_memory.SharedMemory | None, owner: bool,
                 nonce: bytes = b"", whole: torch.Tensor | None = None) -> None:
        self.layout = layout
        self.data = data
        self._shm = shm
        self._owner = owner
        self.nonce = nonce  # the canary's 16 bytes (empty for a peer's pool opened without one)
        self.whole = whole if whole is not None else data  # data + the canary block
        self.ipc = None  # cuda_ipc.IpcExport of a CUDA pool, when it could be exported
        self.ipc_error: str | None = None
        self.stage = None  # kv_stage.HostStage: the host-staging mirror of a shared pool
        if owner and nonce:
            _LOCAL[nonce] = self

    @property
    def shm_name(self) -> str | None:
        return self._shm.name if self._shm is not None else None

    @classmethod
    def allocate(cls, layout: PoolLayout, device: str = "cpu", shared: bool = False) -> KVPool:
        """Allocate the pool once (plus its canary block). `shared`: peers in other processes will
        open it (a shared-memory segment on CPU; on CUDA an IPC export), and it gets a staging mirror."""
        elems = math.prod(layout.shape)
        whole_elems = elems + _canary_elems(layout)
        shm = None
        if device.startswith("cpu") and shared:
            shm = shared_memory.SharedMemory(name=f"tetri-kv-{secrets.token_hex(8)}", create=True,
                                             size=whole_elems * _itemsize(layout))
            whole = torch.frombuffer(shm.buf, dtype=layout.torch_dtype, count=whole_elems)
            whole.zero_()
        else:
            whole = torch.zeros(whole_elems, dtype=layout.torch_dtype, device=device)
        nonce = secrets.token_bytes(16)
        pool = cls(layout, whole[:elems].view(layout.shape), shm, owner=True, nonce=nonce, whole=whole)
        pool._write_canary()
        if shared and device.startswith("cuda"):
            pool._export_ipc()
        return pool  # (its host-staging mirror, if any, is attached by kv_stage.with_stage)

    def _write_canary(self) -> None:
        tail = self.whole.view(torch.uint8)[-CANARY_BYTES:]
        tail.copy_(torch.frombuffer(bytearray(self.nonce * (CANARY_BYTES // 16)), dtype=torch.uint8))

    def _export_ipc(self) -> None:
        from tetri.workers import cuda_ipc

        whole = self.whole.view(torch.uint8)
        try:
            self.ipc = cuda_ipc.export(whole.data_ptr(), whole.numel())
        except cuda_ipc.CudaIpcError as e:
            self.ipc_error = str(e)
            log.warning("KV pool not exported through CUDA IPC (peers will use the host-staged path): %s", e)

    @classmethod
    def open_shared(cls, layout: PoolLayout, shm_name: str) -> KVPool:
        shm = shared_memory.SharedMemory(name=shm_name, create=False)
        elems = math.prod(layout.shape)
        whole_elems = min(shm.size // _itemsize(layout), elems + _canary_elems(layout))
        if whole_elems < elems:
            shm.close()
            raise ValueError(f"segment {shm_name} holds {shm.size} bytes, the layout needs {layout.nbytes}")
        whole = torch.frombuffer(shm.buf, dtype=layout.torch_dtype, count=whole_elems)
        return cls(layout, whole[:elems].view(layout.shape), shm, owner=False, whole=whole)

    @classmethod
    def from_tensor(cls, data: torch.Tensor, layout: PoolLayout) -> KVPool:
        """A pool viewed over memory someone else owns (a mapped peer pool)."""
        return cls(layout, data, None, owner=False)

    @staticmethod
    def local(nonce: bytes) -> KVPool | None:
        """This process's own pool with that canary nonce (the same-process case: no IPC open)."""
        return _LOCAL.get(nonce) if nonce else None

    def canary_tail(self) -> bytes:
        return bytes(self.whole.view(torch.uint8)[-CANARY_BYTES:].cpu().numpy().tobytes())

    def token_rows(self) -> torch.Tensor:
        """`[num_blocks * layers * 2 * block_size, kv_heads * head_dim]`: one row per token's K or
        V of one layer. Row of (block b, layer l, k|v c, offset o) = ((b*L + l)*2 + c)*bs + o."""
        return self.data.view(-1, self.layout.num_kv_heads * self.layout.head_dim)

    def block_rows(self) -> torch.Tensor:
        """`[num_blocks * layers * 2, block_size * kv_heads * head_dim]`: one row per block's K or
        V of one layer. Row of (block b, layer l, k|v c) = (b*L + l)*2 + c."""
        lay = self.layout
        return self.data.view(-1, lay.block_size * lay.num_kv_heads * lay.head_dim)

    def layer(self, layer_idx: int) -> torch.Tensor:
        """`[num_blocks, 2, block_size, kv_heads, head_dim]` view of one layer."""
        return self.data[:, layer_idx]

    def copy_blocks_from(self, src: KVPool, src_ids: list[int], dst_ids: list[int]) -> int:
        """Copy src blocks into our blocks, one copy per run of consecutive ids on both sides, on
        the current stream. Returns the bytes copied."""
        return copy_runs(self.data, src.data, src_ids, dst_ids) * self.layout.block_bytes

    def copy_within(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Fork blocks inside this pool (n > 1 choices share one prefill)."""
        self.copy_blocks_from(self, src_ids, dst_ids)

    def close(self) -> None:
        """Drop the mapping; the creating worker also unlinks the segment (and its mirror)."""
        shm, self._shm = self._shm, None
        self.data = self.whole = torch.empty(0)
        if self.stage is not None:
            self.stage.close()
            self.stage = None
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the OS unmaps at exit
        if self._owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


class HostPool:
    """The prefix cache's host tier: `[num_blocks, *block shape]` in host memory (pinned when
    the pool is on CUDA, so copies to and from it are DMA), one per worker, never shared.
    Accounting is `tetri.sched.kv_host.HostBlocks` inside the `BlockAllocator`."""

    def __init__(self, gpu: KVPool, num_blocks: int) -> None:
        self.gpu = gpu
        shape = (num_blocks, *gpu.layout.shape[1:])
        pin = gpu.data.is_cuda
        self.data = torch.empty(shape, dtype=gpu.layout.torch_dtype, pin_memory=pin)
        self.pinned = pin

    @staticmethod
    def blocks_for(gpu_layout: PoolLayout, size_gib: float) -> int:
        return int(size_gib * 2**30 // gpu_layout.block_bytes) if size_gib > 0 else 0

    def copy(self, src_ids: list[int], dst_ids: list[int], to_host: bool) -> None:
        """The allocator's `on_copy`: GPU -> host (offload) or host -> GPU (upload), one copy
        per run of consecutive ids, on the current stream (ordered before the pass that reads or
        overwrites those GPU blocks)."""
        if to_host:
            copy_runs(self.data, self.gpu.data, src_ids, dst_ids)
        else:
            copy_runs(self.gpu.data, self.data, src_ids, dst_ids)


def device_uuid(index: int) -> bytes:
    """The 16 bytes of a GPU's UUID (peers name GPUs by UUID: indices differ between processes)."""
    import re

    uuid = torch.cuda.get_device_properties(index).uuid
    raw = getattr(uuid, "bytes", None)
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16:
        return bytes(raw)
    found = re.search(r"[0-9a-fA-F]{32}", str(uuid).replace("-", ""))  # "GPU-58b1...-..." or "58b1..."
    if found is None:
        raise RuntimeError(f"cannot read the UUID of cuda:{index} from {uuid!s}")
    return bytes.fromhex(found.group(0))


def _itemsize(layout: PoolLayout) -> int:
    return torch.empty((), dtype=layout.torch_dtype).element_size()


def _canary_elems(layout: PoolLayout) -> int:
    """The canary block's elements: one block, or more if a block is smaller than the canary."""
    per_block = layout.block_bytes // _itemsize(layout)
    return per_block * -(-CANARY_BYTES // layout.block_bytes)


def copy_runs(dst: torch.Tensor, src: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> int:
    """`dst[d] = src[s]` for every pair, one `copy_` per run of consecutive ids on both sides
    (non-blocking where the devices allow). Returns the number of blocks."""
    if len(src_ids) != len(dst_ids):
        raise ValueError("src and dst block lists differ in length")
    for s, d, n in _runs(src_ids, dst_ids):
        dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
    return len(src_ids)


def _runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs
