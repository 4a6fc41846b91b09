"""The front's approximate index of which worker caches which prefix blocks, pure code.

Built from what the front sent where (a prompt's full-block hashes are recorded on its
prefill worker once its prefill finished there; see `tetri.sched.prefix_hash`) and
corrected by the workers' eviction reports (`ChunkDone.evicted_hashes`). It can be wrong
both ways (a report still in flight, a block a worker never cached because another block
already held its hash); nothing depends on it for correctness: the worker attaches what it
really has, and computes the rest.

    matched_blocks(w, hashes): leading blocks of `hashes` the index believes w holds
"""

from __future__ import annotations


class PrefixIndex:
    def __init__(self) -> None:
        self._held: dict[int, set[bytes]] = {}

    def matched_blocks(self, worker_id: int, hashes: list[bytes]) -> int:
        held = self._held.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def add(self, worker_id: int, hashes: list[bytes]) -> None:
        self._held.setdefault(worker_id, set()).update(hashes)

    def evicted(self, worker_id: int, hashes: list[bytes]) -> None:
        held = self._held.get(worker_id)
        if held:
            held.difference_update(hashes)

    def forget(self, worker_id: int) -> None:
        """The worker's cache is gone (it died, restarted or flipped role)."""
        self._held.pop(worker_id, None)

    def num_blocks(self, worker_id: int) -> int:
        return len(self._held.get(worker_id, ()))
