"""The host-memory tier of the prefix cache: which host blocks hold which cached hashes.

Pure bookkeeping, like `kv_blocks` (the memory is `tetri.workers.kv_pool.HostPool`). The GPU
allocator (`BlockAllocator`) owns one of these when `--kv-offloading-size` is set:

    GPU evicts cached block b (hash h)  ->  put(h) takes a free host block x (or drops the
        least recently used host block's hash for good: reported as evicted to the front)
        and the allocator asks for the copy GPU b -> host x
    lookup continues past the GPU-cached prefix into host-cached hashes  ->  pop(h) each,
        GPU blocks are allocated, copies host x -> GPU b are asked for, release(x) after

The tiers are exclusive: a hash lives in the GPU cache or in the host cache, never both (an
upload moves it back; a commit of a hash the host holds drops the host copy). Every host
block is either free or holds exactly one hash (`check`); between `pop` and `release` a
block is held by an upload in flight, which happens inside one allocator call only.

Held by an owner (the KV swap, issue 19 item 5): `hold(owner, n)` takes n host blocks out of
both lists for a preempted job's KV (free ones first, then the least recently used cached
ones, whose hashes are dropped: a live job's only copy outranks a cache entry); they stay
out of the LRU, so nothing evicts them, until `unhold(owner)` frees them (swapped back in,
or the job ended). Every host block is free, cached, or held by exactly one owner (`check`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class HostBlocks:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a host tier needs at least one block")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached host blocks, oldest first
        self._hash_of: dict[int, Hashable] = {}
        self._by_hash: dict[Hashable, int] = {}
        self._held: dict[Hashable, list[int]] = {}  # owner -> its swapped-out KV, in token order

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    @property
    def num_held(self) -> int:
        return sum(len(ids) for ids in self._held.values())

    def can_hold(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free) + len(self._lru)

    def held_by(self, owner: Hashable) -> list[int]:
        return self._held.get(owner, [])

    def hold(self, owner: Hashable, num_blocks: int) -> tuple[list[int], list[Hashable]] | None:
        """Take `num_blocks` host blocks for `owner` (holding none): free ones first, then the
        least recently used cached ones. Returns (blocks, hashes dropped for them), or None
        (nothing taken) when free + cached blocks are too few."""
        if owner in self._held:
            raise ValueError(f"{owner!r} already holds host blocks")
        if not self.can_hold(num_blocks):
            return None
        ids, dropped = [], []
        for _ in range(num_blocks):
            if self._free:
                ids.append(self._free.pop())
                continue
            x, _ = self._lru.popitem(last=False)
            h = self._hash_of.pop(x)
            del self._by_hash[h]
            dropped.append(h)
            ids.append(x)
        self._held[owner] = ids
        return ids, dropped

    def unhold(self, owner: Hashable) -> int:
        """Free `owner`'s held host blocks (unknown owners are a no-op); return how many."""
        ids = self._held.pop(owner, [])
        self._free.extend(ids)
        return len(ids)

    def __contains__(self, h: Hashable) -> bool:
        return h in self._by_hash

    def put(self, h: Hashable) -> tuple[int | None, Hashable | None]:
        """Cache `h` in a host block: a free one, else the least recently used one's (whose
        hash is dropped and returned). Returns (host block, dropped hash or None); (None, h)
        when every host block is held by an upload in flight."""
        if h in self._by_hash:
            raise ValueError(f"{h!r} is already in the host tier")
        dropped = None
        if not self._free and not self._lru:
            return None, h
        if self._free:
            x = self._free.pop()
        else:
            x, _ = self._lru.popitem(last=False)
            dropped = self._hash_of.pop(x)
            del self._by_hash[dropped]
        self._hash_of[x] = h
        self._by_hash[h] = x
        self._lru[x] = None
        return x, dropped

    def pop(self, h: Hashable) -> int:
        """Take `h` out of the tier; its block stays out of both lists until `release`."""
        x = self._by_hash.pop(h)
        del self._hash_of[x]
        del self._lru[x]
        return x

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def discard(self, h: Hashable) -> None:
        """Drop `h` if held (the GPU computed it again: the tiers stay exclusive)."""
        if h in self._by_hash:
            self.release([self.pop(h)])

    def clear(self) -> list[Hashable]:
        """Drop every hash (held blocks stay held); returns them."""
        dropped = list(self._by_hash)
        self._free.extend(self._lru)
        self._lru.clear()
        self._hash_of.clear()
        self._by_hash.clear()
        return dropped

    def check(self) -> None:
        free, cached = set(self._free), set(self._lru)
        held_list = [x for ids in self._held.values() for x in ids]
        held = set(held_list)
        if len(free) != len(self._free) or len(held) != len(held_list):
            raise AssertionError("a host block is on the free list twice, or held twice")
        if free & cached or held & (free | cached) or len(free) + len(cached) + len(held) != self.num_blocks:
            raise AssertionError(f"host: free {len(free)} + cached {len(cached)} + held {len(held)} "
                                 f"!= {self.num_blocks}, or overlap")
        if any(not ids for ids in self._held.values()):
            raise AssertionError("an owner holds an empty host block list")
        every = free | cached | held
        if every and (min(every) < 0 or max(every) >= self.num_blocks):
            raise AssertionError("host block id out of range")
        if set(self._hash_of) != cached:
            raise AssertionError("a cached host block holds no hash, or a free one holds one")
        if len(self._by_hash) != len(self._hash_of) or any(self._hash_of.get(x) != h for h, x in self._by_hash.items()):
            raise AssertionError("the host hash maps disagree")
