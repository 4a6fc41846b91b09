"""The `mixed` role: chunked prefill and decode in one engine (the colocated baseline, and the
offline `LLM`'s engine).

Each step (one forward pass):
  1. every running sequence gets one decode token (growing its blocks; when the pool is
     short, the most junior block holder gives its blocks back: a running sequence is
     preempted (re-prefilled later), a prompt whose prefill is under way restarts later);
  2. the chunk packer adds one chunk of up to `chunk_size` queued prompt tokens (with
     `step_budget` "slo": the largest budget whose step, fitted to this core's measured step
     times, fits the declared TPOT beside this step's decodes; `tetri.sched.step_budget`), possibly
     pieces of several prompts; a prompt's first piece reserves the blocks of its whole
     prefill (and of the forks its other choices will get), so a prefill under way never
     waits for blocks, and prompts are taken strictly in queue order;
  3. one sample per decode and per prompt whose last piece ran; a prompt with n choices
     samples n first tokens from its one prefill and forks its blocks to the other choices.

Seniority is (priority, admission order): lower `priority` first (vLLM's semantics), then
first come. The most senior sequence is never preempted for a junior one, so it always
progresses; a sequence that cannot grow although it holds every block in use (it needs more
than the whole pool) ends its request with an error (`errors`) instead of cycling through
preemption. The executor caps `max_model_len` by the pool, so that only happens when a
caller lifts the cap.

KV swap (`--swap-space`, issue 19 item 5), as on decode workers: a preempted running sequence
is swapped out to the host tier or recomputed, whichever `tetri.sched.swap` finds cheaper by
the costs measured here (per-block swap copy seconds; per-token seconds of steps that prefill);
a swapped one is uploaded back, most senior first, once its blocks fit beside the running
sequences' next tokens (meanwhile no junior prompt's prefill reserves blocks: it keeps its
place, as a recompute keeps its place in the queue), and re-joins the batch once the upload
completed (`workers/kv_swap.py`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tetri.config import EngineSchedConfig
from tetri.sched.chunking import ChunkPacker
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.prefix_hash import cacheable_blocks, extend_block_hashes
from tetri.sched.step_budget import MixedStep, make_step_budget
from tetri.sched.swap import CostMeter
from tetri.types import FinishReason, SamplingParams
from tetri.workers.executor import Executor, SampledToken
from tetri.workers import kv_swap
from tetri.workers.kv_swap import SwapTable
from tetri.workers.model_runner import Segment
from tetri.workers.prompt_logprobs import score_fields
from tetri.workers.seq import Seq


@dataclass
class Request:
    req_id: str
    seqs: list[Seq]
    arrival_s: float = 0.0
    done: set[int] = field(default_factory=set)
    order: int = 0
    """Admission order: the tie-break after priority."""


class MixedCore:
    def __init__(self, executor: Executor, sched: EngineSchedConfig) -> None:
        self.ex = executor
        self.sched = sched
        self.packer = ChunkPacker(sched.chunk_size)
        self.step_budget = make_step_budget(sched.step_budget, sched.chunk_size, sched.step_tpot_s,
                                            max_tokens=sched.max_step_prompt_tokens)
        self.largest_prompt_step = 0
        """Most prompt tokens one step computed (the SLO budget may exceed chunk_size)."""
        self.requests: dict[str, Request] = {}
        self.prefilling: dict[str, Seq] = {}  # packer key -> seq being (re)prefilled
        self.running: list[Seq] = []
        self.errors: list[tuple[str, str]] = []
        """(req_id, why) of requests this core ended because they cannot fit; the caller drains it."""
        self.progressed = False
        self._orders = itertools.count()
        self.swapped: dict[str, Seq] = {}  # preempted, KV in the host tier (copies in flight included)
        self.swap_copies = SwapTable(self._swap_landed)
        self.costs = CostMeter()
        self.swaps = self.recomputes = 0
        self._swap_blocked: tuple | None = None  # rank of the most senior swapped seq waiting for blocks
        self.interleaved_steps = 0
        """Steps that ran prompt tokens beside decodes (the board's `interleaved_steps`)."""
        self.prefill_busy_s = 0.0
        """Seconds of steps that ran prompt tokens (the board's `prefill_busy_s`)."""

    # ---- admission -------------------------------------------------------------
    def add_request(self, req_id: str, prompt_ids: list[int], params: SamplingParams, arrival_s: float = 0.0,
                    priority: int = 0, prior_outputs: int = 0) -> None:
        if req_id in self.requests:
            raise ValueError(f"duplicate request id {req_id!r}")
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if len(prompt_ids) >= self.ex.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_model_len {self.ex.max_model_len}")
        need = blocks_for_tokens(len(prompt_ids) + 1, self.ex.block_size) * params.n
        if need > self.ex.blocks.num_blocks:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens with n={params.n} needs {need} KV blocks; "
                             f"the pool holds {self.ex.blocks.num_blocks}")
        seqs = [Seq(req_id, c, prompt_ids, params, arrival_s=arrival_s, priority=priority,
                    prior_outputs=prior_outputs) for c in range(params.n)]
        order = next(self._orders)
        self.requests[req_id] = Request(req_id, seqs, arrival_s, order=order)
        self.prefilling[seqs[0].key] = seqs[0]
        self.packer.add(seqs[0].key, len(prompt_ids), self._cached_start(seqs[0]), priority=priority, order=order)

    def abort(self, req_id: str) -> list[Seq]:
        req = self.requests.pop(req_id, None)
        if req is None:
            return []
        for seq in req.seqs:
            self.packer.remove(seq.key)
            self.prefilling.pop(seq.key, None)
            self._drop_swapped(seq)
            self.ex.free(seq)
        self.running = [s for s in self.running if s.req_id != req_id]
        return req.seqs

    def abort_choice(self, req_id: str, choice: int) -> None:
        req = self.requests.get(req_id)
        if req is None or choice in req.done:
            return
        seq = req.seqs[choice]
        seq.finish_reason = FinishReason.ABORT
        if seq in self.running:
            self.running.remove(seq)
        self._drop_swapped(seq)
        if choice == 0 and seq.key in self.prefilling:
            return  # its prefill still feeds the other choices; it samples nothing itself
        self.ex.free(seq)
        self._finish(req, seq)

    def has_work(self) -> bool:
        return bool(self.running or len(self.packer) or self.swapped)

    @property
    def num_waiting(self) -> int:
        return len(self.packer)

    # ---- one step ----------------------------------------------------------------
    def step(self) -> list[SampledToken]:
        errors_before = len(self.errors)
        self._resume_swapped()
        decodes = self._grow_decodes()
        context_tokens = sum(s.num_tokens for s in decodes)
        pieces = self._pack_prefill(self.step_budget.budget(len(decodes), context_tokens)
                                    if self.step_budget.adaptive else None)
        segments = [self.ex.decode_segment(s) for s in decodes]
        samplers: list[list[Seq]] = [[s] for s in decodes]
        for seq, piece, begin in pieces:
            end = piece.start + piece.num_tokens
            scoring = {} if seq.recompute else score_fields(seq.prompt_ids, begin, end - begin, seq.params)
            self.ex.blocks.check_writable(seq.key, begin, end)
            seg = Segment(seq.tokens(begin, end), begin, self.ex.blocks.blocks_of(seq.key),
                          piece.is_last and not seq.recompute, **scoring)
            segments.append(seg)
            if seg.sample:
                samplers.append(self._choices(seq))
        self.progressed = bool(segments or self.swap_copies) or len(self.errors) > errors_before
        if not segments:
            self._after_prefill(pieces)  # pieces wholly in the cache: nothing to run
            return []
        for s in decodes:
            s.num_computed += 1
        for seq, piece, _ in pieces:
            seq.num_computed = piece.start + piece.num_tokens
        start = time.perf_counter()
        sampled = self.ex.run(segments, samplers)
        step_s = time.perf_counter() - start
        prefill_tokens = sum(p.num_tokens for _, p, _ in pieces)
        self.interleaved_steps += bool(prefill_tokens and decodes)
        if prefill_tokens:  # a step that prefills: its seconds per token, decodes counted as one each
            self.prefill_busy_s += step_s
            self.costs.add_prefill(prefill_tokens + len(decodes), step_s)
        computed_tokens = sum(p.start + p.num_tokens - begin for _, p, begin in pieces)
        self.largest_prompt_step = max(self.largest_prompt_step, computed_tokens)
        self.step_budget.observe(MixedStep(computed_tokens, len(decodes), context_tokens), step_s)
        if self.ex.runner.last_scores is not None:  # prompt logprobs: prefill segments follow the decodes
            for (seq, _, _), scores in zip(pieces, self.ex.runner.last_scores[len(decodes):]):
                if scores is not None:
                    seq.prompt_logprobs = (seq.prompt_logprobs or []) + scores
        for seq in decodes:
            self.ex.commit_computed(seq, decoded=True)
        for seq, _, _ in pieces:
            self.ex.commit_computed(seq)
        self._after_prefill(pieces)
        self._retire(sampled)
        return sampled

    def _rank(self, seq: Seq) -> tuple[int, int, int]:
        """Seniority: lower is more senior (kept from preemption, prefilled first)."""
        return (seq.priority, self.requests[seq.req_id].order, seq.choice)

    def _grow_decodes(self) -> list[Seq]:
        """The running sequences that step now, each with room for its next token."""
        bs = self.ex.block_size
        while True:
            self.running.sort(key=self._rank)
            run = self.running[: self.sched.max_num_seqs]
            need = [s for s in run if s.num_tokens > len(self.ex.blocks.blocks_of(s.key)) * bs]
            if len(need) <= self.ex.blocks.num_free:
                for s in need:
                    self.ex.blocks.ensure_capacity(s.key, s.num_tokens)
                return run
            holders = self.running + [s for s in self.prefilling.values() if self.ex.blocks.blocks_of(s.key)]
            victim = max(holders, key=self._rank)
            if len(holders) == 1:  # it holds every block in use and still cannot grow
                self._fail(victim.req_id, f"the request needs more than this worker's {self.ex.blocks.num_blocks} "
                                          f"KV blocks of {bs} tokens")
            elif victim.key in self.prefilling:
                self._restart_prefill(victim)
            else:
                self._preempt(victim)

    def _preempt(self, seq: Seq) -> None:
        """Swap `seq` out, or free its blocks to re-prefill prompt + outputs later, by the
        measured costs (`tetri.sched.swap`)."""
        self.running.remove(seq)
        blocks = self.ex.blocks
        fits = blocks.can_swap_out(seq.key)
        mode = self.sched.preemption_mode
        if self.costs.choose(len(blocks.blocks_of(seq.key)), seq.num_computed, fits, mode) == "swap":
            if kv_swap.swap_out(self.ex, seq, self.swapped, self.swap_copies):
                self.swaps += 1
                return
        self.recomputes += 1
        self.ex.free(seq)
        seq.num_computed = 0
        seq.recompute = True
        self.prefilling[seq.key] = seq
        self._queue_prefill(seq)

    def _resume_swapped(self) -> None:
        """Land the swap copies the host saw complete (with nothing else to do, wait for the
        oldest), then start uploading swapped sequences, most senior first, while their blocks
        fit beside the blocks the running sequences' next tokens need."""
        idle = not self.running and not len(self.packer)
        self.swap_copies.land(wait_oldest=idle)
        bs, blocks = self.ex.block_size, self.ex.blocks
        growing = sum(1 for s in self.running if s.num_tokens > len(blocks.blocks_of(s.key)) * bs)
        self._swap_blocked = None
        for seq in sorted(self.swapped.values(), key=self._rank):
            if seq.key in self.swap_copies:
                continue  # its swap-out (or upload) is still in flight
            if blocks.swapped_blocks(seq.key) + growing > blocks.num_free:
                self._swap_blocked = self._rank(seq)  # no junior prefill takes blocks before it
                break
            self.swap_copies.add(seq, self.ex.start_swap_in(seq), to_host=False)

    def _swap_landed(self, seq: Seq, to_host: bool, copy) -> None:
        """The host saw a swap copy complete: a swapped-in seq's host blocks are freed and it
        re-joins the batch (a swapped-out one may now be uploaded)."""
        self.costs.add_copy(copy.num_blocks, copy.seconds())
        if to_host:
            return
        self.ex.finish_swap_in(seq)
        del self.swapped[seq.key]
        self.running.append(seq)

    def _drop_swapped(self, seq: Seq) -> None:
        """An aborted seq's swap: wait for its copy in flight, then free its host blocks (its
        pool blocks, if its upload just landed, are freed by the caller)."""
        if seq.key not in self.swapped:
            return
        self.swap_copies.settle(seq.key)  # an upload landing re-joins `running`: taken out again
        self.swapped.pop(seq.key, None)
        self.running = [s for s in self.running if s is not seq]
        self.ex.blocks.drop_swapped(seq.key)

    def _restart_prefill(self, seq: Seq) -> None:
        """Give back the blocks a prefill under way reserved; it starts over later, in order."""
        for holder in self._reservation_holders(seq):
            self.ex.free(holder)
        seq.num_computed = 0
        self.packer.remove(seq.key)
        self._queue_prefill(seq)

    def _queue_prefill(self, seq: Seq) -> None:
        req = self.requests[seq.req_id]
        self.packer.add(seq.key, self._prefill_len(seq), self._cached_start(seq), priority=seq.priority,
                        order=req.order)

    def _prefill_len(self, seq: Seq) -> int:
        """Tokens a (re)prefill computes: the prompt, or everything but the last token."""
        return seq.num_tokens - 1 if seq.recompute else len(seq.prompt_ids)

    def _reservation_holders(self, seq: Seq) -> list[Seq]:
        """The seq, and for a first prefill the other open choices it will fork to."""
        if seq.recompute or seq.choice != 0:
            return [seq]
        return [seq] + [o for o in self.requests[seq.req_id].seqs[1:] if o.finish_reason is None]

    def _reserve(self, seq: Seq) -> bool:
        """On a prefill's first piece: blocks for the whole prefill (and its forks), or False."""
        if self.ex.blocks.blocks_of(seq.key):
            return True
        if self._swap_blocked is not None and self._rank(seq) > self._swap_blocked:
            return False  # a more senior swapped sequence waits for blocks: it goes first
        holders = self._reservation_holders(seq)
        per = blocks_for_tokens(self._prefill_len(seq), self.ex.block_size)
        self.ex.attach_cached_prefix(seq, self._prefill_len(seq))  # its cached prefix, shared
        attached = len(self.ex.blocks.blocks_of(seq.key))
        if per * len(holders) - attached > self.ex.blocks.num_free:
            self.ex.free(seq)  # let go of the cached blocks until it fits (and count the lookup then)
            if self.ex.blocks.caching and seq.params.prompt_logprobs is None:
                self.ex.blocks.uncount_last_lookup()
            seq.num_computed = 0
            return False
        for holder in holders:
            self.ex.blocks.allocate(holder.key, per - (attached if holder is seq else 0))
        return True

    def _pack_prefill(self, budget_tokens: int | None = None) -> list[tuple[Seq, object]]:
        out = []
        pieces = self.packer.next_chunk(budget_tokens)
        for i, piece in enumerate(pieces):
            seq = self.prefilling[piece.req_id]
            if not self._reserve(seq):  # runs once blocks free up; nothing behind it overtakes
                for later in reversed(pieces[i:]):
                    self.packer.push_front(later)
                break
            end = piece.start + piece.num_tokens
            if seq.num_computed >= end and not piece.is_last:
                continue  # wholly cached (the last piece always computes a token)
            out.append((seq, piece, min(seq.num_computed, end)))
        return out

    def _cached_start(self, seq: Seq) -> int:
        """Where its prefill would start now, from the cache (0 with caching off): the
        packer then fills the chunk with uncached tokens only."""
        blocks = self.ex.blocks
        if not blocks.caching or seq.params.prompt_logprobs is not None:
            return 0
        n = self._prefill_len(seq)
        hashes = extend_block_hashes(seq.block_hashes, seq.tokens(0, n), self.ex.block_size, self.ex.hash_seed)
        return len(blocks.match(hashes[:cacheable_blocks(n, self.ex.block_size)])) * self.ex.block_size

    def _choices(self, seq: Seq) -> list[Seq]:
        if seq.choice == 0 and not seq.output_ids:
            return [s for s in self.requests[seq.req_id].seqs if s.finish_reason is None]
        return [seq]

    def _after_prefill(self, pieces) -> None:
        for seq, piece, _ in pieces:
            if not piece.is_last:
                continue
            self.prefilling.pop(seq.key, None)
            if seq.recompute:
                seq.recompute = False
                self.running.append(seq)
                continue
            req = self.requests[seq.req_id]
            src_ids = self.ex.blocks.blocks_of(seq.key)
            for other in req.seqs[1:]:
                if other.finish_reason is None:  # into the blocks reserved for it
                    self.ex.pool.copy_within(src_ids, self.ex.blocks.blocks_of(other.key))
                    other.num_computed = seq.num_computed
            self.running.extend(s for s in req.seqs if s.finish_reason is None)
            if seq.finish_reason is FinishReason.ABORT:
                self.ex.free(seq)
                self._finish(req, seq)

    def _retire(self, sampled: list[SampledToken]) -> None:
        for st in sampled:
            if st.finished:
                if st.seq in self.running:
                    self.running.remove(st.seq)
                self.ex.free(st.seq)
                self._finish(self.requests[st.seq.req_id], st.seq)

    def _fail(self, req_id: str, why: str) -> None:
        """End a request that cannot make progress here: every choice finishes with an error."""
        for seq in self.abort(req_id):
            if seq.finish_reason is None:
                seq.finish_reason = FinishReason.ERROR
        self.errors.append((req_id, why))

    def _finish(self, req: Request, seq: Seq) -> None:
        req.done.add(seq.choice)
        if len(req.done) == len(req.seqs):
            self.requests.pop(req.req_id, None)
