"""The `decode` role: takes prefilled requests over, copies their KV, decodes them.

Each step:
  1. admission: the local policy (`tetri.sched.decode_policy`) picks waiting handoffs that
     fit; each one's KV is copied from the prefill worker's pool in a few large copies,
     acked with `KVCopied` (the prefill worker then frees its copy); n choices get n copies;
  2. the policy picks which running sequences step (and which to preempt: each is swapped out
     to the host tier (`--swap-space`) or its blocks are freed and it is re-prefilled here from
     prompt + output, whichever `tetri.sched.swap` finds cheaper by the costs measured here:
     per-block swap copy seconds and per-token seconds of re-prefill steps; a swapped one is
     uploaded back, in priority order, as soon as its blocks fit, before it is due to run);
  3. one forward pass over the decodes (and any re-prefills); the node sends one `TokenBatch`.
Prefix caching (on with the worker's `CacheConfig`, as on prefill and mixed workers): a
handoff's prompt blocks this worker already caches under the same hash chain (the previous
turn of a conversation decoded here) are attached, shared and never written, and only the
blocks after them are copied; copied prompt blocks are committed once they landed, and each
block a decode step fills is committed too, so a finished request's blocks stay cached (LRU,
evicted only when the free list runs out). `handoff_blocks_copied` / `handoff_blocks_cached`
count the blocks each way (summed over choices).
Copies run on the peer pair's transfer path (`workers/kv_transfer.py`): on CPU they finish at
once; on CUDA they run on a copy stream while decode steps go on, and the request joins the
batch (and `KVCopied` goes out) only once the host has seen the copy's event complete. A
request is never read from a peer pool after an Abort was processed: an Abort waits for the
request's copy in flight before its destination blocks are freed and `Dropped` is sent.
The handoff's part of this (admission, the copy, the ack, the drop) is
`workers/handoff_side.py::HandoffIntake`, which this core composes.

Board fields (`load`): `predicted_decode_tokens` is the predicted tokens still to come
(low end of the bucket less what each sequence has generated, summed over running, waiting,
copying and preempted sequences); a request is a heavy decode when its prediction exceeds
`heavy_decode_tokens` (the front's `--heavy-decode-tokens`), otherwise light (also without
a prediction). Policies see `priority` (lower first) in every view.
"""

from __future__ import annotations

import time
from tetri.protocol import Handoff, KVCopied
from tetri.sched.decode_policy import DecodeReqView
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.swap import CostMeter
from tetri.workers.executor import Executor, SampledToken
from tetri.workers.handoff_side import HandoffIntake
from tetri.workers import kv_swap
from tetri.workers.kv_swap import SwapTable
from tetri.workers.kv_transfer import PeerSource
from tetri.workers.model_runner import Segment
from tetri.workers.seq import Seq


class DecodeCore:
    def __init__(self, executor: Executor, worker_id: int, policy, max_num_seqs: int = 256,
                 heavy_decode_tokens: int = 128, preemption_mode: str = "auto") -> None:
        self.ex = executor
        self.worker_id = worker_id
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.heavy_decode_tokens = heavy_decode_tokens
        self.progressed = False
        """Whether the last step did anything (admitted, copied, re-prefilled or decoded)."""
        self.intake = HandoffIntake(executor, worker_id)
        """The handoffs: waiting for admission, being copied in, and the peer pools (`handoff_side`)."""
        self.running: dict[str, Seq] = {}  # seq key -> seq, in admission order
        self.recompute: dict[str, Seq] = {}  # preempted, to re-prefill before resuming
        self.swapped: dict[str, Seq] = {}  # preempted, KV in the host tier, to upload before resuming
        self.swap_copies = SwapTable(self._swap_landed)  # swaps of `swapped` seqs with copies in flight
        self.preemption_mode = preemption_mode
        self.costs = CostMeter()
        self.swaps = self.recomputes = 0
        self.predicted: dict[str, int] = {}
        self._resumed: list[Seq] = []
        self._preempted = False

    # ---- the handoff side (`workers/handoff_side.py`) ---------------------------------
    @property
    def peers(self) -> dict[int, PeerSource]:
        return self.intake.peers

    @property
    def copies(self):
        return self.intake.copies

    @property
    def waiting(self) -> dict:
        return self.intake.waiting

    @property
    def handoff_blocks_copied(self) -> int:
        return self.intake.handoff_blocks_copied

    @property
    def handoff_blocks_cached(self) -> int:
        return self.intake.handoff_blocks_cached

    def add_peer(self, worker_id: int, source) -> None:
        self.intake.add_peer(worker_id, source)

    def retire_peer(self, worker_id: int) -> None:
        self.intake.retire_peer(worker_id)

    def handoff(self, msg: Handoff, now: float) -> None:
        self.intake.handoff(msg, now)
        if msg.predicted_output_tokens is not None:
            self.predicted[msg.req_id] = msg.predicted_output_tokens

    def abort(self, req_id: str, choice: int | None = None) -> bool:
        """Drop the request (or one choice); True when this worker knew it."""
        known = self.intake.drop(req_id, choice)
        for key, seq in list(self.swapped.items()):
            if seq.req_id == req_id and (choice is None or seq.choice == choice):
                self.swap_copies.settle(key)  # a swap copy in flight: wait for it before freeing anything
        for table in (self.running, self.recompute, self.swapped):
            for key in [k for k, s in table.items() if s.req_id == req_id and (choice is None or s.choice == choice)]:
                seq = table.pop(key)
                self.ex.free(seq)
                self.ex.blocks.drop_swapped(key)
                self.policy.forget(key)
                known = True
        if choice is None:
            self.predicted.pop(req_id, None)
        return known

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.recompute or self.swapped or self.copies)

    def load(self) -> dict:
        remaining = 0
        for req_id, w in self.waiting.items():
            if w.msg.predicted_output_tokens is not None:
                done = w.msg.prior_output_tokens + 1  # the first token came from the prefill
                remaining += max(0, w.msg.predicted_output_tokens - done) * len(w.msg.open_choices)
        held = set(self.waiting)
        for table in (self.running, self.recompute, self.swapped):
            for seq in table.values():
                held.add(seq.req_id)
                if seq.req_id in self.predicted:
                    remaining += max(0, self.predicted[seq.req_id] - seq.num_outputs)
        for copy in self.copies._by_req.values():  # copying in: their seqs hold the first token
            held.add(copy.req_id)
            for seq in copy.seqs:
                if copy.req_id in self.predicted:
                    remaining += max(0, self.predicted[copy.req_id] - seq.num_outputs)
        heavy = sum(1 for r in held if self.predicted.get(r, 0) > self.heavy_decode_tokens)
        return dict(running_reqs=len(self.running),
                    waiting_reqs=len(self.waiting) + len(self.recompute) + len(self.swapped) + len(self.copies),
                    predicted_decode_tokens=remaining, heavy_decodes=heavy, light_decodes=len(held) - heavy)

    # ---- one step ------------------------------------------------------------------
    def step(self, now: float) -> tuple[list[SampledToken], list[KVCopied]]:
        acks = self.intake.admit(self.policy, [self._view(s) for s in self.running.values()], now)
        acks += self.intake.landed(self.running, idle=not self.running and not self.recompute)
        self.swap_copies.land(wait_oldest=not self.running and not self.recompute)
        segments, samplers = self._resume_preempted()
        resumed = {seg_seq.key for seg_seq in self._resumed}
        decodes = [s for s in self._schedule(now) if s.key not in resumed]
        if any(s.key not in self.running for s in self._resumed):
            # preempted again before its re-prefill ran: its blocks are freed (another sequence
            # may already hold them), so its segment must not run (it used to write them)
            kept = [i for i, s in enumerate(self._resumed) if s.key in self.running]
            segments, samplers = [segments[i] for i in kept], [samplers[i] for i in kept]
            self._resumed = [self._resumed[i] for i in kept]
        for s in decodes:
            segments.append(self.ex.decode_segment(s))
            samplers.append([s])
            s.num_computed += 1
        # a copy in flight (handoff or swap): wait on it
        self.progressed = bool(segments or acks or self._preempted or self.copies or self.swap_copies)
        if not segments:
            return [], acks
        start = time.perf_counter()
        sampled = self.ex.run(segments, [x for x in samplers if x])
        prefill_tokens = sum(s.num_tokens - 1 for s in self._resumed)
        if prefill_tokens:  # a re-prefill step: its seconds per token, decodes counted as one each
            self.costs.add_prefill(prefill_tokens + len(decodes), time.perf_counter() - start)
        self.policy.on_step([s.key for s in decodes], now)
        for s in decodes:
            self.ex.commit_computed(s, decoded=True)
        for s in self._resumed:
            self.ex.commit_computed(s)
        for st in sampled:
            seq = st.seq
            if st.finished:
                self.running.pop(seq.key, None)
                self.ex.free(seq)
                self.policy.forget(seq.key)
                if not any(s.req_id == seq.req_id for t in (self.running, self.recompute, self.swapped)
                           for s in t.values()):
                    self.predicted.pop(seq.req_id, None)
        return sampled, acks

    def _view(self, seq: Seq) -> DecodeReqView:
        return DecodeReqView(seq.key, seq.num_tokens, seq.num_outputs, seq.params.max_tokens,
                             self.predicted.get(seq.req_id), seq.arrival_s,
                             len(self.ex.blocks.blocks_of(seq.key)), priority=seq.priority)

    def _schedule(self, now: float) -> list[Seq]:
        views = [self._view(s) for s in self.running.values()]
        run_ids, preempt_ids = self.policy.schedule(views, self.max_num_seqs, self.ex.blocks.num_free, self.ex.block_size, now)
        self._preempted = bool(preempt_ids)
        for key in preempt_ids:
            self._preempt(self.running.pop(key))
        out = []
        for key in run_ids:
            seq = self.running[key]
            if seq.num_tokens > len(self.ex.blocks.blocks_of(key)) * self.ex.block_size:
                if not self.ex.blocks.can_allocate(1):
                    continue
                self.ex.blocks.ensure_capacity(key, seq.num_tokens)
            out.append(seq)
        return out

    def _preempt(self, seq: Seq) -> None:
        """Swap `seq` out or free it for a recompute, by the measured costs (`tetri.sched.swap`);
        a swap-out's blocks are free at once, ordered after its copy on the device (`kv_swap`)."""
        blocks = self.ex.blocks
        n = len(blocks.blocks_of(seq.key))
        computed = all(s is not seq for s in self._resumed)  # a re-prefill not run yet has no KV to swap
        fits = blocks.can_swap_out(seq.key)
        pending = bool(self.recompute)  # a re-prefill to come measures the prefill cost
        if computed and self.costs.choose(n, seq.num_computed, fits, self.preemption_mode, pending) == "swap":
            if kv_swap.swap_out(self.ex, seq, self.swapped, self.swap_copies):
                self.swaps += 1
                return
        self.ex.free(seq)
        seq.num_computed = 0
        self.recompute[seq.key] = seq
        self.recomputes += 1

    def _swap_landed(self, seq: Seq, to_host: bool, copy) -> None:
        """The host saw a swap copy complete: a swapped-out seq may be swapped back in; a
        swapped-in one's host blocks are freed and it re-joins the batch."""
        self.costs.add_copy(copy.num_blocks, copy.seconds())
        if to_host:
            return
        self.ex.finish_swap_in(seq)
        del self.swapped[seq.key]
        self.running[seq.key] = seq

    def _resume_preempted(self) -> tuple[list[Segment], list[list[Seq]]]:
        """Bring preempted sequences back in priority order (stable: preemption order within
        one) when their blocks fit: start uploading a swapped one (it decodes once the upload
        completed: this step on CPU), re-prefill a recomputed one (all tokens but the last)."""
        segments, samplers = [], []
        self._resumed = []
        order = sorted([*self.swapped.values(), *self.recompute.values()], key=lambda s: s.priority)
        for seq in order:
            key = seq.key
            if key in self.swapped:
                if key in self.swap_copies:
                    continue  # its swap-out (or upload) is still in flight
                if self.ex.blocks.swapped_blocks(key) > self.ex.blocks.num_free:
                    break
                self.swap_copies.add(seq, self.ex.start_swap_in(seq), to_host=False)
                continue
            if blocks_for_tokens(seq.num_tokens, self.ex.block_size) > self.ex.blocks.num_free:
                break
            del self.recompute[key]
            n = seq.num_tokens - 1
            begin = self.ex.attach_cached_prefix(seq, n)  # its cached leading blocks, shared
            self.ex.blocks.ensure_capacity(key, seq.num_tokens)
            self.ex.blocks.check_writable(key, begin, n)
            segments.append(Segment(seq.tokens(begin, n), begin, self.ex.blocks.blocks_of(key), False))
            samplers.append([])
            seq.num_computed = n
            self.running[key] = seq
            self._resumed.append(seq)
        return segments, samplers
