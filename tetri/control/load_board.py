"""The shared-memory load board: one fixed-layout row per worker.

The front process creates the segment (an unpredictable name, unlinked at exit); each
worker attaches and is the only writer of its own row; the front scheduler reads every row
without locks or messages. A seqlock keeps readers from using a torn row:

    writer: version += 1 (odd: writing) -> write fields -> version += 1 (even: stable)
    reader: v1 = version (retry while odd) -> read fields -> v2 = version; retry unless v1 == v2
A writer can be descheduled mid-write (or die there), so a reader that keeps seeing a torn
row yields, and after `TORN_WAIT_S` uses the row's last stable snapshot instead of waiting.

Row layout (little-endian, 8-byte fields, 256-byte stride):
    version, heartbeat_s, role, state, pid, queued_prefill_tokens, running_reqs, waiting_reqs,
    free_blocks, total_blocks, predicted_decode_tokens, heavy_decodes, light_decodes,
    block_size, restarts, max_num_seqs, prefix_cache_queries, prefix_cache_hits,
    host_prefix_cache_hits, kv_offloaded_blocks, kv_uploaded_blocks, handoff_blocks_copied,
    handoff_blocks_cached, step_s (a float: the worker's recent step time, an EWMA; 0: none yet),
    kv_swapped_out_blocks, kv_swapped_in_blocks, preemptions_swap, preemptions_recompute,
    swapped_reqs, swap_held_blocks, interleaved_steps, prefill_busy_s (a float)
"""

from __future__ import annotations

import secrets
import struct
import time
from multiprocessing import shared_memory

from tetri.sched.load import ROLE_CODES, ROLE_NAMES, STATE_CODES, STATE_NAMES, WorkerLoad

_VERSION = struct.Struct("<Q")
_BODY = struct.Struct("<d" + "q" * 21 + "d" + "q" * 7 + "d")
ROW_BYTES = 256
TORN_WAIT_S = 0.05
FIELDS = ("heartbeat_s", "role", "state", "pid", "queued_prefill_tokens", "running_reqs", "waiting_reqs",
          "free_blocks", "total_blocks", "predicted_decode_tokens", "heavy_decodes", "light_decodes",
          "block_size", "restarts", "max_num_seqs", "prefix_cache_queries", "prefix_cache_hits",
          "host_prefix_cache_hits", "kv_offloaded_blocks", "kv_uploaded_blocks", "handoff_blocks_copied",
          "handoff_blocks_cached", "step_s", "kv_swapped_out_blocks", "kv_swapped_in_blocks", "preemptions_swap",
          "preemptions_recompute", "swapped_reqs", "swap_held_blocks", "interleaved_steps",
          "prefill_busy_s")


SWAP_FIELDS = ("kv_swapped_out_blocks", "kv_swapped_in_blocks", "preemptions_swap", "preemptions_recompute",
               "swapped_reqs", "swap_held_blocks")  # the KV swap's (issue 19 item 5), as in WorkerLoad


class LoadBoard:
    def __init__(self, shm: shared_memory.SharedMemory, num_workers: int, owner: bool) -> None:
        self._shm = shm
        self.num_workers = num_workers
        self._owner = owner
        self._buf = shm.buf
        self._last_good: dict[int, dict] = {}

    @property
    def name(self) -> str:
        return self._shm.name

    @classmethod
    def create(cls, num_workers: int) -> LoadBoard:
        name = f"tetri-board-{secrets.token_hex(8)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, num_workers) * ROW_BYTES)
        shm.buf[:] = bytes(len(shm.buf))
        return cls(shm, num_workers, owner=True)

    @classmethod
    def attach(cls, name: str, num_workers: int) -> LoadBoard:
        # Workers are spawned by the front and share its resource tracker, where attaching
        # registers the name again (a no-op); only the creator unlinks.
        shm = shared_memory.SharedMemory(name=name, create=False)
        return cls(shm, num_workers, owner=False)

    # ---- writer side (a worker, its own row only) --------------------------------------
    def write(self, worker_id: int, *, role: str, state: str, pid: int, queued_prefill_tokens: int = 0,
              running_reqs: int = 0, waiting_reqs: int = 0, free_blocks: int = 0, total_blocks: int = 0,
              predicted_decode_tokens: int = 0, heavy_decodes: int = 0, light_decodes: int = 0,
              block_size: int = 16, restarts: int = 0, max_num_seqs: int = 0, prefix_cache_queries: int = 0,
              prefix_cache_hits: int = 0, host_prefix_cache_hits: int = 0, kv_offloaded_blocks: int = 0,
              kv_uploaded_blocks: int = 0, handoff_blocks_copied: int = 0, handoff_blocks_cached: int = 0,
              step_s: float = 0.0, kv_swapped_out_blocks: int = 0, kv_swapped_in_blocks: int = 0,
              preemptions_swap: int = 0, preemptions_recompute: int = 0, swapped_reqs: int = 0,
              swap_held_blocks: int = 0, interleaved_steps: int = 0, prefill_busy_s: float = 0.0) -> None:
        off = worker_id * ROW_BYTES
        (version,) = _VERSION.unpack_from(self._buf, off)
        if version % 2:  # a writer died mid-write: step back onto an even value
            version += 1
        _VERSION.pack_into(self._buf, off, version + 1)
        _BODY.pack_into(self._buf, off + 8, time.monotonic(), ROLE_CODES[role], STATE_CODES[state], pid,
                        queued_prefill_tokens, running_reqs, waiting_reqs, free_blocks, total_blocks,
                        predicted_decode_tokens, heavy_decodes, light_decodes, block_size, restarts, max_num_seqs,
                        prefix_cache_queries, prefix_cache_hits, host_prefix_cache_hits, kv_offloaded_blocks,
                        kv_uploaded_blocks, handoff_blocks_copied, handoff_blocks_cached, float(step_s),
                        kv_swapped_out_blocks, kv_swapped_in_blocks, preemptions_swap, preemptions_recompute,
                        swapped_reqs, swap_held_blocks, interleaved_steps, float(prefill_busy_s))
        _VERSION.pack_into(self._buf, off, version + 2)

    def set_state(self, worker_id: int, state: str) -> None:
        """Front side: mark a row (e.g. dead) after its writer is gone."""
        row = self.read_raw(worker_id)
        row["state"] = STATE_CODES[state]
        args = {k: row[k] for k in FIELDS if k not in ("heartbeat_s",)}
        args["role"] = ROLE_NAMES.get(args["role"], "mixed")
        args["state"] = state
        self.write(worker_id, **args)

    # ---- reader side -----------------------------------------------------------------
    def read_raw(self, worker_id: int) -> dict:
        off = worker_id * ROW_BYTES
        deadline = None
        while True:
            (v1,) = _VERSION.unpack_from(self._buf, off)
            if not v1 % 2:
                body = _BODY.unpack_from(self._buf, off + 8)
                (v2,) = _VERSION.unpack_from(self._buf, off)
                if v1 == v2:
                    row = dict(zip(FIELDS, body), version=v1)
                    self._last_good[worker_id] = row
                    return row
            now = time.monotonic()
            deadline = deadline or now + TORN_WAIT_S
            if now > deadline:
                return dict(self._last_good.get(worker_id) or dict.fromkeys(FIELDS, 0) | {"version": 0})
            time.sleep(0)  # let the writer finish

    def read(self, worker_id: int) -> WorkerLoad:
        row = self.read_raw(worker_id)
        return WorkerLoad(
            worker_id=worker_id, role=ROLE_NAMES.get(row["role"], "mixed"),
            state=STATE_NAMES.get(row["state"], "starting") if row["version"] else "starting",
            heartbeat_s=row["heartbeat_s"], queued_prefill_tokens=row["queued_prefill_tokens"],
            running_reqs=row["running_reqs"], waiting_reqs=row["waiting_reqs"], free_blocks=row["free_blocks"],
            total_blocks=row["total_blocks"], predicted_decode_tokens=row["predicted_decode_tokens"],
            heavy_decodes=row["heavy_decodes"], light_decodes=row["light_decodes"], block_size=row["block_size"],
            max_num_seqs=row["max_num_seqs"],
            prefix_cache_queries=row["prefix_cache_queries"], prefix_cache_hits=row["prefix_cache_hits"],
            host_prefix_cache_hits=row["host_prefix_cache_hits"], kv_offloaded_blocks=row["kv_offloaded_blocks"],
            kv_uploaded_blocks=row["kv_uploaded_blocks"],
            handoff_blocks_copied=row["handoff_blocks_copied"], handoff_blocks_cached=row["handoff_blocks_cached"],
            step_s=row["step_s"], **{k: row[k] for k in SWAP_FIELDS}, interleaved_steps=row["interleaved_steps"],
            prefill_busy_s=row["prefill_busy_s"],
        )

    def read_all(self) -> list[WorkerLoad]:
        return [self.read(i) for i in range(self.num_workers)]

    def close(self) -> None:
        self._buf = None
        try:
            self._shm.close()
        except BufferError:
            pass
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
