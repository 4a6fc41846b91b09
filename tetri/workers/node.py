"""A worker without sockets: the role core plus message dispatch.

`handle(msg)` and `step(now)` return the messages to send to the front. The process shell
(`workers/proc.py`) wraps a node with ZeroMQ and the load board; tests run nodes in one
process and route messages by hand.

`can_step()` is "a step would do something": the core has work and its last step made
progress, or a message arrived since (or the shell retries on its heartbeat tick). A core
that has work but cannot step (blocks held until a `Release`, handoffs its admission
policy refuses for now) leaves the shell blocked on its socket instead of spinning.
"""

from __future__ import annotations

import logging
import os
import time

from tetri.config import EngineSchedConfig
from tetri.protocol import (Abort, ChunkPlan, Handoff, KVCopied, PeerPaths, PeerPools, PoolInfo, Release,
                            SetRole, Shutdown, SubmitMixed, TokenBatch, WorkerError)
from tetri.workers import handoff_side, side_cores
from tetri.workers.executor import Executor
from tetri.workers.kv_swap import swap_board_fields

log = logging.getLogger("tetri.worker")
STEP_EWMA = 0.2
"""Weight of the latest step in `step_s`."""


def pool_info(pool) -> PoolInfo:
    """Everything a peer needs to open this pool: layout, canary, and per path its name or handle."""
    from tetri.workers.kv_pool import LAYOUT, device_uuid

    lay, dev = pool.layout, pool.data.device
    info = dict(num_blocks=lay.num_blocks, num_layers=lay.num_layers, block_size=lay.block_size,
                num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, dtype=lay.dtype, shm_name=pool.shm_name,
                canary=pool.nonce, owner_pid=os.getpid(), block_bytes=lay.block_bytes, layout=LAYOUT,
                stage_shm=pool.stage.name if pool.stage is not None else None)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else 0
        info |= dict(device_uuid=device_uuid(index), device_index=index, export_error=pool.ipc_error)
        if pool.ipc is not None:
            info |= dict(cuda_ipc=pool.ipc.handle, ipc_offset=pool.ipc.offset, ipc_size=pool.ipc.size)
    return PoolInfo(**info)


def open_pool(info: PoolInfo, worker_id: int = -1, device: str = "cpu"):
    """Open a peer's pool for copying out of (`kv_transfer.open_peer`: the best path that opens
    and whose canary matches; never raises)."""
    from tetri.workers.kv_transfer import LocalEnd, open_peer

    return open_peer(info, LocalEnd(worker_id, device))


class WorkerNode:
    def __init__(self, worker_id: int, role: str, executor: Executor, sched: EngineSchedConfig,
                 collect_hidden: bool = False, pool_opener=open_pool) -> None:
        self.worker_id = worker_id
        self.role = role
        self.ex = executor
        self.sched = sched
        self.collect_hidden = collect_hidden
        self.pool_opener = pool_opener
        self.peer_infos: dict[int, PoolInfo] = {}
        self.stop = False
        self.stalled = False
        """The last step did nothing; cleared by a message (or the shell's periodic retry)."""
        self.core = self._make_core(role)
        self.side: dict = {}
        """Adaptive roles: cores besides the role's one, by role (`workers/side_cores.py`)."""
        self.step_s = 0.0
        """EWMA of the duration of steps that did something (the board's `step_s`)."""
        self.prefill_busy_s = 0.0
        """Seconds of prefill-role steps, and of retired mixed cores' prompt steps (board)."""

    def _make_core(self, role: str):
        if role == "prefill":
            from tetri.workers.prefill import PrefillCore

            return PrefillCore(self.ex, self.worker_id, collect_hidden=self.collect_hidden)
        if role == "decode":
            from tetri.sched.decode_registry import make_decode_policy
            from tetri.workers.decode import DecodeCore

            core = DecodeCore(self.ex, self.worker_id, make_decode_policy(self.sched.decode_policy),
                              self.sched.max_num_seqs, heavy_decode_tokens=self.sched.heavy_decode_tokens,
                              preemption_mode=self.sched.preemption_mode)
            for wid, info in self.peer_infos.items():
                if wid != self.worker_id:
                    core.add_peer(wid, self._open_peer(info))
            return core
        from tetri.workers.mixed import MixedCore

        return MixedCore(self.ex, self.sched)

    def has_work(self) -> bool:
        return self.core.has_work() or side_cores.has_work(self)

    def can_step(self) -> bool:
        return not self.stalled and self.has_work()

    # ---- messages ----------------------------------------------------------------------
    def handle(self, msg, now: float) -> list:
        self.stalled = False
        core, out = self.core, []
        routed = side_cores.route(self, msg, now)  # adaptive roles: a side core's message
        if routed is not None:
            return routed
        if isinstance(msg, Abort) and self.side:
            out.extend(side_cores.abort(self, msg))
        match msg:
            case ChunkPlan() if self.role == "prefill":
                core.submit(msg)
            case Handoff() if self.role == "decode":
                core.handoff(msg, now)
            case Release() if self.role == "prefill":
                core.release(msg.req_id)
            case Abort():
                out.extend(self._abort(msg))
            case SubmitMixed() if self.role == "mixed":
                try:
                    core.add_request(msg.req_id, msg.prompt_token_ids, msg.params, msg.arrival_s,
                                     priority=msg.priority, prior_outputs=msg.prior_output_tokens)
                except ValueError as e:
                    out.append(WorkerError(worker_id=self.worker_id, message=str(e), req_id=msg.req_id))
            case PeerPools():
                side_cores.peers(self, msg)  # before _peers replaces peer_infos
                out.extend(self._peers(msg))
            case SetRole():
                self._set_role(msg.role)
            case Shutdown():
                self.stop = True
            case _:
                log.warning("worker %d (%s) dropped unexpected %s", self.worker_id, self.role, type(msg).__name__)
        return out

    def _abort(self, msg: Abort) -> list:
        if self.role == "prefill":
            self.core.abort(msg.req_id)
        elif self.role == "decode":
            return handoff_side.decode_abort(self.core, self.worker_id, msg)  # Dropped: nothing held or read
        elif msg.choice is None:
            self.core.abort(msg.req_id)
        else:
            self.core.abort_choice(msg.req_id, msg.choice)
        return []

    def _open_peer(self, info: PoolInfo):
        if self.pool_opener is open_pool:
            return open_pool(info, self.worker_id, self.ex.device)
        return self.pool_opener(info)  # tests: an opener of their own

    def _peers(self, msg: PeerPools) -> list:
        """Open each peer pool once (a restarted peer comes back with a new pool: the old mapping
        is closed once no copy reads it), and report the path chosen per peer. An owner whose
        peers asked for staging stages the prompts it holds now."""
        from tetri.workers import kv_stage

        old, self.peer_infos = self.peer_infos, dict(msg.pools)
        if self.ex.pool.stage is not None:  # a dead peer's flag stays set in the mirror: stage for the live
            self.ex.pool.stage.live = frozenset(w for w in msg.pools if w != self.worker_id)
        if self.role == "prefill":
            kv_stage.stage_backlog(self.ex, self.core)
        if self.role != "decode":
            return []
        core = self.core
        for wid in [w for w in core.peers if w not in msg.pools or old.get(w) != msg.pools[w]]:
            core.retire_peer(wid)
        paths, errors = {}, {}
        for wid, info in msg.pools.items():
            if wid == self.worker_id:
                continue
            if wid not in core.peers:
                core.add_peer(wid, self._open_peer(info))
            src = core.peers[wid]
            paths[wid] = src.path
            if src.error:
                errors[wid] = src.error
        return [PeerPaths(worker_id=self.worker_id, paths=paths, errors=errors)]

    def close_peers(self) -> None:
        """Shutdown: close every peer mapping (after the copies reading it)."""
        for core in [self.core] * (self.role == "decode") + [c for r, c in self.side.items() if r == "decode"]:
            for wid in list(core.peers):
                core.retire_peer(wid)

    def _set_role(self, role: str) -> None:
        """Instance flip: same process, weights and pool; only the role core changes. The
        front drains the worker first, so the old core holds nothing; except a flip to or
        from mixed (`side_cores.IN_PLACE`), which happens in place: the old core runs on as a
        side core until it holds nothing, the new one takes the new requests (a side core of
        the new role, left by an earlier in-place flip, becomes the role core again)."""
        if role == self.role:
            return
        busy = self.core.has_work() or self.ex.blocks.num_used or side_cores.has_work(self)
        if busy and (self.role, role) not in side_cores.IN_PLACE:
            log.warning("worker %d asked to flip while busy; ignored", self.worker_id)
            return
        old_role, old_core = self.role, self.core
        self.role = role
        if old_role == "mixed":  # the board's prefill_busy_s stays cumulative across the flip
            self.prefill_busy_s, old_core.prefill_busy_s = self.prefill_busy_s + old_core.prefill_busy_s, 0.0
        if busy:
            side_cores.adopt(self, old_role, old_core)  # in place: its cache stays (the front forgets it)
            self.core = self.side.pop(role, None) or self._make_core(role)
        else:
            side_cores.close(self)  # an idle side core (a mixed worker's handoff core) goes too
            self.ex.blocks.clear_cache()  # the front forgets what this worker cached
            self.core = self._make_core(role)
        log.info("worker %d: role %s -> %s%s", self.worker_id, old_role, role, " (in place)" if busy else "")

    # ---- steps -------------------------------------------------------------------------
    def step(self, now: float) -> list:
        start_s = time.perf_counter()
        out = self._step_role(now) if self.core.has_work() else []
        stalled = self.stalled or not self.core.has_work()
        if self.side:  # adaptive roles: one step of each side core too
            carried = any(isinstance(m, (KVCopied, TokenBatch)) for m in out)
            side_out, side_progressed = side_cores.step(self, now, token_batch)
            out.extend(side_out)
            stalled = stalled and not side_progressed
            if not carried:  # the evictions ride on the side cores' first carrier instead
                self._report_evictions(out)
        self.stalled = stalled
        if not stalled:  # the board's step_s: what a decode here waits per token, lately
            took_s = time.perf_counter() - start_s
            if self.role == "prefill":  # the board's prefill_busy_s (a mixed core counts its own)
                self.prefill_busy_s += took_s
            self.step_s = took_s if not self.step_s else STEP_EWMA * took_s + (1 - STEP_EWMA) * self.step_s
        return out

    def _step_role(self, now: float) -> list:
        if self.role == "prefill":
            done = self.core.step()
            if done is not None:
                from tetri.workers import kv_stage

                kv_stage.stage_finished(self.ex, self.core, done)  # before the peers hear of it
            self.stalled = done is None
            return [done] if done is not None else []
        if self.role == "decode":
            sampled, out = self.core.step(now)
        else:
            sampled = self.core.step()
            out = [WorkerError(worker_id=self.worker_id, message=why, req_id=req_id)
                   for req_id, why in self.core.errors]
            self.core.errors.clear()
        self.stalled = not self.core.progressed
        out = [*out, token_batch(self.worker_id, sampled)] if sampled else list(out)
        self._report_evictions(out)
        return out

    def _report_evictions(self, out: list) -> None:
        """Decode and mixed workers: the cached hashes evicted so far ride on this step's first
        KVCopied or TokenBatch (the front's indexes of what each worker caches); with neither
        they wait for the next step that has one."""
        carrier = next((m for m in out if isinstance(m, (KVCopied, TokenBatch))), None)
        if carrier is not None:
            carrier.evicted_hashes = self.ex.blocks.take_evicted()

    def board_fields(self) -> dict:
        core, blocks = self.core, self.ex.blocks
        if self.role == "decode":
            extra = core.load() | dict(handoff_blocks_copied=core.handoff_blocks_copied,
                                       handoff_blocks_cached=core.handoff_blocks_cached)
        elif self.role == "prefill":
            extra = dict(queued_prefill_tokens=core.queued_tokens, running_reqs=core.num_prefilling,
                         waiting_reqs=len(core.done))
        else:
            extra = dict(queued_prefill_tokens=core.packer.queued_tokens, running_reqs=len(core.running),
                         waiting_reqs=core.num_waiting, interleaved_steps=core.interleaved_steps)
        extra["prefill_busy_s"] = self.prefill_busy_s + getattr(core, "prefill_busy_s", 0.0)
        fields = dict(role=self.role, free_blocks=blocks.num_free, total_blocks=blocks.num_blocks,
                      block_size=blocks.block_size, max_num_seqs=self.sched.max_num_seqs,
                      prefix_cache_queries=blocks.queries, prefix_cache_hits=blocks.hits,
                      host_prefix_cache_hits=blocks.host_hits, kv_offloaded_blocks=blocks.offloaded_blocks,
                      kv_uploaded_blocks=blocks.uploaded_blocks, step_s=round(self.step_s, 6), **extra,
                      **swap_board_fields(core, blocks))  # the KV swap's counters (issue 19 item 5)
        return side_cores.board_fields(self, fields) if self.side else fields


def token_batch(worker_id: int, sampled) -> TokenBatch:
    batch = TokenBatch(worker_id=worker_id, req_ids=[], choices=[], token_ids=[], finish_reasons=[], logprobs=[],
                       prompt_logprobs=[])
    for st in sampled:
        seq = st.seq
        batch.req_ids.append(seq.req_id)
        batch.choices.append(seq.choice)
        batch.token_ids.append(st.token)
        batch.finish_reasons.append(seq.finish_reason.value if st.finished else None)
        batch.logprobs.append(seq.logprobs[-1] if seq.params.logprobs is not None else None)
        first = seq.prompt_logprobs is not None and len(seq.output_ids) == 1
        batch.prompt_logprobs.append(seq.prompt_logprobs if first else None)
    if not any(batch.prompt_logprobs):
        batch.prompt_logprobs = []  # the common case: nothing on the wire
    return batch
