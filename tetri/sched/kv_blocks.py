"""KV block accounting: which block ids are free, who holds the rest, which are cached.

Pure bookkeeping (no tensors): the memory lives in `tetri.workers.kv_pool`. One allocator per
worker pool. An owner is any hashable key (a request id, or `(req_id, choice)` for forks).

    pool:  [ b0 | b1 | b2 | ... | bN-1 ]       free list: ids nobody holds, no cached content
    owner "r1" -> [b4, b2, b7]                 a request's blocks in token order
    slot of token t of r1 = blocks[t // block_size] * block_size + t % block_size

Prefix caching (`enable_caching`): a full block whose KV was computed is *committed* under
its hash (`tetri.sched.prefix_hash`: a chain over its tokens and every token before it).
A later request whose leading blocks hash the same *attaches* those blocks instead of
computing them: a block then has several holders (`ref` counts them), and nobody writes it
again (`check_writable`). A cached block nobody holds stays cached, in LRU order
(`_evictable`), and still counts as free: `allocate` takes uncached free blocks first and
evicts the least recently released cached ones only when those run out; the hashes it
evicted are kept for `take_evicted` (the front's index of who caches what).

Host tier (`host_blocks` > 0, `tetri.sched.kv_host`): an evicted cached block's hash moves to
a host block instead of being dropped (`on_copy(gpu_ids, host_ids, True)` asks the caller to
copy the contents, before anything rewrites those GPU blocks); only a hash the host tier drops
is reported evicted. `lookup` continues past the GPU-cached prefix into host-cached hashes:
it allocates GPU blocks for them and asks for `on_copy(host_ids, gpu_ids, False)` (the
upload), after which they are ordinary cached, held blocks. A hash is never in both tiers.

KV swap (issue 19 item 5; the host tier then exists with caching off too): `swap_out(owner)`
holds host blocks for every block of `owner` (its unhashed last partial block included),
asks for the offload `on_copy(gpu_ids, host_ids, True)` and frees the GPU blocks;
`swap_in(owner)` allocates GPU blocks, asks for the upload and frees the host ones;
`drop_swapped(owner)` frees them unread (the job ended while swapped out). `begin_*`/`end_*`
split each into accounting before and after an asynchronous copy (the caller copies):
between them the owner holds both its pool blocks and its host blocks. With
`offload_evicted=False` the host tier is the swap space only (evicted cached blocks drop). The copy is asked
for before anything can rewrite the GPU blocks freed, so on one stream the order holds.

Invariants (`check_invariants`): every block is in exactly one of free, evictable (cached,
no holder) or held (ref >= 1); ref[b] is the number of owner lists naming b; a block held
more than once is cached; the hash maps are inverse of each other and name only cached
blocks; no owner lists a block twice.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

from tetri.sched.kv_host import HostBlocks

CopyFn = Callable[[list[int], list[int], bool], None]
"""on_copy(src_ids, dst_ids, to_host): GPU -> host (offload) when to_host, else host -> GPU."""


class OutOfBlocks(RuntimeError):
    pass


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False, host_blocks: int = 0,
                 on_copy: CopyFn | None = None, offload_evicted: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_caching
        # Pop from the end: low ids first, which keeps a request's blocks mostly contiguous.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; oldest first
        self._owned: dict[Hashable, list[int]] = {}
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._evicted: list[bytes] = []
        self.queries = 0
        """Prompt tokens looked up in the cache (vLLM's prefix_cache_queries)."""
        self.hits = 0
        """Of those, tokens found cached (vLLM's prefix_cache_hits)."""
        self.evictions = 0
        """Cached blocks evicted to make room."""
        self.host = HostBlocks(host_blocks) if host_blocks > 0 else None
        self.offload_evicted = offload_evicted
        """Evicted cached blocks go to the host tier (False: it is the KV swap's space only)."""
        self.on_copy = on_copy
        self.host_hits = 0
        """Of `hits`, tokens found in the host tier (uploaded)."""
        self.offloaded_blocks = 0
        self.uploaded_blocks = 0
        self.swapped_out_blocks = 0
        self.swapped_in_blocks = 0
        self._last_lookup = (0, 0, 0)  # (queried, hit, host-hit tokens) of the last lookup

    @property
    def num_free(self) -> int:
        """Blocks an `allocate` can hand out: uncached free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some owner holds (cached blocks nobody holds count as free)."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def owners(self) -> list[Hashable]:
        return list(self._owned)

    def blocks_of(self, owner: Hashable) -> list[int]:
        return self._owned.get(owner, [])

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def _take(self, offloads: list[tuple[int, int]]) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)
        h = self._hash_of.pop(block)
        del self._by_hash[h]
        self.evictions += 1
        if self.host is None or not self.offload_evicted:
            self._evicted.append(h)
            return block
        x, dropped = self.host.put(h)
        if dropped is not None:
            self._evicted.append(dropped)
        if x is not None:
            offloads.append((block, x))
        return block

    def _take_n(self, num_blocks: int) -> list[int]:
        """Fresh blocks, the evicted ones' contents offloaded (asked for before returning)."""
        offloads: list[tuple[int, int]] = []
        new_ids = [self._take(offloads) for _ in range(num_blocks)]
        if offloads:
            self.offloaded_blocks += len(offloads)
            self._copy([b for b, _ in offloads], [x for _, x in offloads], True)
        for b in new_ids:
            self._ref[b] = 1
        return new_ids

    def _copy(self, src: list[int], dst: list[int], to_host: bool) -> None:
        if self.on_copy is not None:
            self.on_copy(src, dst, to_host)

    def allocate(self, owner: Hashable, num_blocks: int) -> list[int]:
        """Append `num_blocks` fresh (uncached, unshared) blocks to `owner`'s list."""
        if num_blocks > self.num_free:
            raise OutOfBlocks(f"need {num_blocks} blocks, {self.num_free} free")
        new_ids = self._take_n(num_blocks)
        self._owned.setdefault(owner, []).extend(new_ids)
        return new_ids

    def ensure_capacity(self, owner: Hashable, num_tokens: int) -> list[int]:
        """Grow `owner` so it can hold `num_tokens` tokens; return only the new block ids."""
        have = len(self._owned.get(owner, ()))
        need = blocks_for_tokens(num_tokens, self.block_size) - have
        return self.allocate(owner, need) if need > 0 else []

    def free(self, owner: Hashable) -> int:
        """Release every block of `owner` (unknown owners are a no-op); return how many.
        Cached blocks nobody holds any more become evictable, the last block first (a
        prompt's tail is evicted before its head, which more requests share)."""
        ids = self._owned.pop(owner, None)
        if not ids:
            return 0
        for b in reversed(ids):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        return len(ids)

    # ---- KV swap -------------------------------------------------------------------------
    def can_swap_out(self, owner: Hashable) -> bool:
        n = len(self._owned.get(owner, ()))
        return self.host is not None and n > 0 and self.host.can_hold(n) and not self.host.held_by(owner)

    def swapped_blocks(self, owner: Hashable) -> int:
        return len(self.host.held_by(owner)) if self.host is not None else 0

    def swap_out(self, owner: Hashable) -> int:
        """`begin_swap_out`, `on_copy`, `end_swap_out`: blocks moved (0: the host cannot hold them)."""
        ids = self.begin_swap_out(owner)
        if ids is None:
            return 0
        self._copy(*ids, True)
        return self.end_swap_out(owner)

    def begin_swap_out(self, owner: Hashable) -> tuple[list[int], list[int]] | None:
        """Hold host blocks for every block of `owner`; return (its block ids, the host ids) for
        the caller's copy, or None (nothing done) when the host tier cannot hold them. `owner`
        keeps its blocks until `end_swap_out` (an asynchronous copy still reads them)."""
        if not self.can_swap_out(owner):
            return None
        ids = list(self._owned[owner])
        host_ids, dropped = self.host.hold(owner, len(ids))
        self._evicted.extend(dropped)
        self.swapped_out_blocks += len(ids)
        return ids, host_ids

    def end_swap_out(self, owner: Hashable) -> int:
        """The swap-out copy completed: free `owner`'s blocks here (its host blocks stay held)."""
        return self.free(owner)

    def swap_in(self, owner: Hashable) -> list[int]:
        """`begin_swap_in`, `on_copy`, `end_swap_in`: the new block ids (raises OutOfBlocks)."""
        host_ids, gpu_ids = self.begin_swap_in(owner)
        self._copy(host_ids, gpu_ids, False)
        self.end_swap_in(owner)
        return gpu_ids

    def begin_swap_in(self, owner: Hashable) -> tuple[list[int], list[int]]:
        """Allocate GPU blocks for swapped-out `owner` (holding none here); return (its host ids,
        the new block ids) for the caller's copy. The host blocks stay held until `end_swap_in`."""
        host_ids = self.host.held_by(owner) if self.host is not None else []
        if not host_ids:
            raise ValueError(f"{owner!r} is not swapped out")
        if self._owned.get(owner):
            raise ValueError(f"{owner!r} already holds blocks")
        gpu_ids = self.allocate(owner, len(host_ids))
        self.swapped_in_blocks += len(gpu_ids)
        return list(host_ids), gpu_ids

    def end_swap_in(self, owner: Hashable) -> int:
        """The upload completed: free `owner`'s host blocks."""
        return self.host.unhold(owner)

    def drop_swapped(self, owner: Hashable) -> int:
        """Free a swapped-out owner's host blocks unread (aborted or finished)."""
        return self.host.unhold(owner) if self.host is not None else 0

    # ---- prefix caching ------------------------------------------------------------------
    def match(self, hashes: list[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes` (no side effects)."""
        out = []
        if self.caching:
            for h in hashes:
                b = self._by_hash.get(h)
                if b is None:
                    break
                out.append(b)
        return out

    def attach(self, owner: Hashable, block_ids: list[int]) -> None:
        """Make `owner` (holding nothing yet) a holder of cached `block_ids`, in order."""
        if self._owned.get(owner):
            raise ValueError(f"{owner!r} already holds blocks")
        for b in block_ids:
            if b not in self._hash_of:
                raise ValueError(f"block {b} is not cached")
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        if block_ids:
            self._owned[owner] = list(block_ids)

    def lookup(self, owner: Hashable, hashes: list[bytes], num_tokens: int, keep_free_blocks: int = 0) -> int:
        """Attach the cached prefix of `hashes` (the leading full blocks of a `num_tokens`
        prefill) to `owner`, uploading its host-cached blocks; count the lookup; return the
        cached tokens. The prefix stops where attaching an unheld block or an upload would
        leave fewer than `keep_free_blocks` free (blocks promised to pieces planned first)."""
        ids, uploaded = self._attach_tiers(owner, hashes, keep_free_blocks)
        self.queries += num_tokens
        self.hits += len(ids) * self.block_size
        self.host_hits += uploaded * self.block_size
        self._last_lookup = (num_tokens, len(ids) * self.block_size, uploaded * self.block_size)
        return len(ids) * self.block_size

    def uncount_last_lookup(self) -> None:
        """Take the last `lookup` out of the counters (its request let go and will look up again)."""
        num_tokens, hit_tokens, host_tokens = self._last_lookup
        self.queries -= num_tokens
        self.hits -= hit_tokens
        self.host_hits -= host_tokens
        self._last_lookup = (0, 0, 0)

    def cached_prefix_blocks(self, hashes: list) -> int:
        """Leading hashes cached in either tier (no side effects, free blocks not checked)."""
        n = 0
        for h in hashes if self.caching else ():
            if h not in self._by_hash and (self.host is None or h not in self.host):
                break
            n += 1
        return n

    def _tier_plan(self, hashes: list, keep_free: int) -> list[tuple[Hashable, int | None]]:
        """The longest prefix of `hashes` cached in either tier that fits: (hash, GPU block, or
        None for a host one). Attaching an unheld GPU block and allocating an upload target
        each take one of `num_free` (so no upload evicts a block of the same prefix), and
        `keep_free` of them stay free."""
        plan: list[tuple[Hashable, int | None]] = []
        free_left = self.num_free - keep_free
        for h in hashes if self.caching else ():
            b = self._by_hash.get(h)
            if b is None and (self.host is None or h not in self.host):
                break
            if b is None or self._ref[b] == 0:
                free_left -= 1
                if free_left < 0:
                    break
            plan.append((h, b))
        return plan

    def _attach_tiers(self, owner: Hashable, hashes: list, keep_free: int) -> tuple[list[int], int]:
        if self._owned.get(owner):
            raise ValueError(f"{owner!r} already holds blocks")
        plan = self._tier_plan(hashes, keep_free)
        host_ids = [self.host.pop(h) for h, b in plan if b is None]  # out of the host LRU: never evicted now
        self.attach(owner, [b for _, b in plan if b is not None])
        targets = self._take_n(len(host_ids))
        if host_ids:
            self._copy(host_ids, targets, False)
            self.host.release(host_ids)
            self.uploaded_blocks += len(host_ids)
        ids, fresh = [], iter(targets)
        for h, b in plan:
            if b is None:
                b = next(fresh)
                self._hash_of[b] = h
                self._by_hash[h] = b
            ids.append(b)
        if ids:
            self._owned[owner] = ids
        return ids, len(host_ids)

    def commit(self, owner: Hashable, hashes: list[bytes], first_block: int = 0) -> None:
        """Cache `owner`'s blocks [first_block, len(hashes)) (full, their KV computed) under
        `hashes`. A block already cached stays as it is; a hash already cached in another
        block (two requests computed the same prefix at once) leaves this block uncached."""
        if not self.caching:
            return
        ids = self._owned.get(owner, [])
        for b, h in zip(ids[first_block:len(hashes)], hashes[first_block:]):
            if b in self._hash_of or h in self._by_hash:
                continue
            if self.host is not None:
                self.host.discard(h)  # computed again here: the host copy is redundant
            self._hash_of[b] = h
            self._by_hash[h] = b

    def take_evicted(self) -> list[bytes]:
        """Hashes evicted since the last call."""
        out, self._evicted = self._evicted, []
        return out

    def clear_cache(self) -> None:
        """Drop every cached block nobody holds (an instance flip); held ones stay cached."""
        for b in self._evictable:
            self._evicted.append(self._hash_of.pop(b))
            del self._by_hash[self._evicted[-1]]
            self._free.append(b)
        self._evictable.clear()
        if self.host is not None:
            self._evicted.extend(self.host.clear())

    def check_writable(self, owner: Hashable, start_token: int, stop_token: int) -> None:
        """The blocks `owner` is about to write tokens [start, stop) into are its alone and
        uncached: a shared (cached) block is never written."""
        ids = self._owned.get(owner, [])
        bs = self.block_size
        for i in range(start_token // bs, blocks_for_tokens(stop_token, bs)):
            b = ids[i]
            if self._ref[b] != 1 or b in self._hash_of:
                raise AssertionError(f"{owner!r} would write block {b} (refs {self._ref[b]}, cached "
                                     f"{b in self._hash_of}) at tokens [{start_token}, {stop_token})")

    def check_invariants(self) -> None:
        owned = [b for ids in self._owned.values() for b in ids]
        refs = Counter(owned)
        held = set(refs)
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if len(held) + len(free) + len(evictable) != self.num_blocks or held & free or held & evictable \
                or free & evictable:
            raise AssertionError(f"held {len(held)} + free {len(free)} + evictable {len(evictable)} "
                                 f"!= total {self.num_blocks}, or a block is in two of them")
        every = held | free | evictable
        if every and (min(every) < 0 or max(every) >= self.num_blocks):
            raise AssertionError("block id out of range")
        for b, n in refs.items():
            if self._ref[b] != n:
                raise AssertionError(f"block {b}: ref {self._ref[b]} but {n} holders")
            if n > 1 and b not in self._hash_of:
                raise AssertionError(f"block {b} is shared but not cached")
        if sum(self._ref) != len(owned) or min(self._ref) < 0:  # so every unheld block has ref 0
            raise AssertionError("a block nobody holds has a nonzero ref")
        if any(len(set(ids)) != len(ids) for ids in self._owned.values()):
            raise AssertionError("an owner lists a block twice")
        if free & set(self._hash_of) or not evictable <= set(self._hash_of):
            raise AssertionError("a free block is cached, or an evictable one is not")
        if len(self._by_hash) != len(self._hash_of) or any(self._hash_of.get(b) != h for h, b in self._by_hash.items()):
            raise AssertionError("the hash maps disagree")
        if not self.caching and self._hash_of:
            raise AssertionError("caching is off but blocks are cached")
        if self.host is not None:
            self.host.check()
            both = [h for h in self._by_hash if h in self.host]
            if both:
                raise AssertionError(f"{len(both)} hashes cached both on the GPU and in the host tier")
