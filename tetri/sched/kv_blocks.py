"""KV block accounting: which block ids are free and who owns the rest.

Pure bookkeeping (no tensors): the memory lives in `tetri.workers.kv_pool`. One allocator per
worker pool. An owner is any hashable key (a request id, or `(req_id, choice)` for forks).

    pool:  [ b0 | b1 | b2 | ... | bN-1 ]       free list: ids nobody owns
    owner "r1" -> [b4, b2, b7]                 a request's blocks in token order
    slot of token t of r1 = blocks[t // block_size] * block_size + t % block_size

Invariant (`check_invariants`): free + owned == total, and no block is owned twice or both
owned and free.
"""

from __future__ import annotations

from collections.abc import Hashable


class OutOfBlocks(RuntimeError):
    pass


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Pop from the end: low ids first, which keeps a request's blocks mostly contiguous.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owned: dict[Hashable, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def owners(self) -> list[Hashable]:
        return list(self._owned)

    def blocks_of(self, owner: Hashable) -> list[int]:
        return self._owned.get(owner, [])

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, owner: Hashable, num_blocks: int) -> list[int]:
        """Append `num_blocks` fresh blocks to `owner`'s list and return the new ids."""
        if num_blocks > len(self._free):
            raise OutOfBlocks(f"need {num_blocks} blocks, {len(self._free)} free")
        new_ids = [self._free.pop() for _ in range(num_blocks)]
        self._owned.setdefault(owner, []).extend(new_ids)
        return new_ids

    def ensure_capacity(self, owner: Hashable, num_tokens: int) -> list[int]:
        """Grow `owner` so it can hold `num_tokens` tokens; return only the new block ids."""
        have = len(self._owned.get(owner, ()))
        need = blocks_for_tokens(num_tokens, self.block_size) - have
        return self.allocate(owner, need) if need > 0 else []

    def free(self, owner: Hashable) -> int:
        """Release every block of `owner` (unknown owners are a no-op); return how many."""
        ids = self._owned.pop(owner, None)
        if not ids:
            return 0
        self._free.extend(reversed(ids))
        return len(ids)

    def check_invariants(self) -> None:
        owned = [b for ids in self._owned.values() for b in ids]
        if len(owned) + len(self._free) != self.num_blocks:
            raise AssertionError(
                f"free {len(self._free)} + owned {len(owned)} != total {self.num_blocks}"
            )
        every = owned + self._free
        if len(set(every)) != len(every):
            raise AssertionError("a block is owned twice or both owned and free")
        if every and (min(every) < 0 or max(every) >= self.num_blocks):
            raise AssertionError("block id out of range")
