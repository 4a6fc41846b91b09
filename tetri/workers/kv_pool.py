"""The paged KV pool: one tensor allocated once per worker, block-major.

    data: [num_blocks, num_layers, 2 (k|v), block_size, num_kv_heads, head_dim]

A block holds every layer's K and V for `block_size` tokens in one contiguous span, so moving
a request to another pool is one `copy_` per run of consecutive block ids (few, large
copies). On CPU the tensor lives in a named shared-memory segment that peer workers open
by name; on CUDA it is ordinary device memory that peers open through CUDA IPC handles
(torch.multiprocessing's storage sharing). Accounting (which ids are free) is
`tetri.sched.kv_blocks.BlockAllocator`; this module only owns memory and copies.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from tetri.workers.models.llama import ArchSpec


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

    def __init__(self, layout: PoolLayout, data: torch.Tensor, shm: shared_memory.SharedMemory | None, owner: bool) -> None:
        self.layout = layout
        self.data = data
        self._shm = shm
        self._owner = owner

    @property
    def shm_name(self) -> str | None:
        return self._shm.name if self._shm is not None else None

    @classmethod
    def allocate(cls, layout: PoolLayout, device: str = "cpu", shared: bool = False) -> KVPool:
        if device.startswith("cpu") and shared:
            name = f"tetri-kv-{secrets.token_hex(8)}"
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.nbytes)
            data = torch.frombuffer(shm.buf, dtype=layout.torch_dtype, count=math.prod(layout.shape)).view(layout.shape)
            data.zero_()
            return cls(layout, data, shm, owner=True)
        data = torch.zeros(layout.shape, dtype=layout.torch_dtype, device=device)
        return cls(layout, data, None, owner=True)

    @classmethod
    def open_shared(cls, layout: PoolLayout, shm_name: str) -> KVPool:
        shm = shared_memory.SharedMemory(name=shm_name, create=False)
        data = torch.frombuffer(shm.buf, dtype=layout.torch_dtype, count=math.prod(layout.shape)).view(layout.shape)
        return cls(layout, data, shm, owner=False)

    @classmethod
    def from_tensor(cls, data: torch.Tensor, layout: PoolLayout) -> KVPool:
        """A peer's pool received as a tensor (CUDA IPC through torch.multiprocessing)."""
        return cls(layout, data, None, owner=False)

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
        """Copy src blocks into our blocks, one copy per run of consecutive ids on both sides.
        Returns the bytes copied."""
        if len(src_ids) != len(dst_ids):
            raise ValueError("src and dst block lists differ in length")
        for s, d, n in _runs(src_ids, dst_ids):
            self.data[d:d + n].copy_(src.data[s:s + n], non_blocking=True)
        return len(src_ids) * self.layout.block_bytes

    def copy_within(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Fork blocks inside this pool (n > 1 choices share one prefill)."""
        self.copy_blocks_from(self, src_ids, dst_ids)

    def close(self) -> None:
        """Drop the mapping; the creating worker also unlinks the segment."""
        shm, self._shm = self._shm, None
        self.data = torch.empty(0)
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
