"""The `prefill` role: runs the chunks the front scheduler sends, one per forward pass.

A prompt's blocks stay here after its last piece ran, until the front sends `Release`
(its KV was copied by a decode worker, or the request was abandoned) or `Abort`: the hold
is `workers/handoff_side.py::HeldPrompts`.

Prefix caching: when a prompt's first piece runs, its cached leading blocks are attached
(`Executor.attach_cached_prefix`) and only the tokens after them are computed. The front
starts the first piece where its index expects the cache to end; where the cache turned out
shorter (evicted meanwhile) the piece also computes the gap, where longer, it computes less.
After the pass, the full blocks computed are committed to the cache.

    ChunkPlan -> attach cached prefixes -> allocate blocks for every piece (wait while short)
              -> one forward pass -> first token(s) for prompts whose last piece ran
              -> ChunkDone(finished=[PrefillResult(block ids, first tokens)])

When the whole chunk does not fit the free blocks, its leading pieces that do fit run now
and the rest stays at the head (`ChunkDone(partial=True)`): pieces of several prompts may
share a chunk, and a pool that holds every one of them but not all at once must not wedge.
A piece whose request was aborted (or already prefilled) needs no blocks and never counts.
`step` returns None only when not even the head piece fits: the blocks it waits for are
held by prefilled prompts until their `Release`.
"""

from __future__ import annotations

from collections import deque

from tetri.protocol import ChunkDone, ChunkPlan, PrefillResult
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.workers.executor import Executor
from tetri.workers.handoff_side import HeldPrompts
from tetri.workers.model_runner import Segment
from tetri.workers.prompt_logprobs import score_fields
from tetri.workers.seq import Seq


class PrefillCore:
    def __init__(self, executor: Executor, worker_id: int, collect_hidden: bool = False) -> None:
        self.ex = executor
        self.worker_id = worker_id
        self.collect_hidden = collect_hidden
        self.chunks: deque[ChunkPlan] = deque()
        self.seqs: dict[str, list[Seq]] = {}  # req_id -> its choices (choice 0 owns the blocks)
        self.holds = HeldPrompts(executor)  # prefilled, blocks held until Release
        self.prompt_lps: dict[str, list] = {}  # req_id -> prompt logprobs so far (when asked)
        self.looked_up: set[str] = set()  # requests whose cached prefix was attached
        self.cached_tokens: dict[str, int] = {}  # req_id -> prompt tokens found in the cache

    def submit(self, plan: ChunkPlan) -> None:
        # A request's data arrives with its first piece; record it now so an Abort that
        # arrives before the chunk runs finds it (and its later pieces are skipped).
        for p in plan.pieces:
            if p.new is not None and p.req_id not in self.seqs:
                self.seqs[p.req_id] = [Seq(p.req_id, c, p.new.prompt_token_ids, p.new.params,
                                           arrival_s=p.new.arrival_s, priority=p.new.priority,
                                           prior_outputs=p.new.prior_output_tokens)
                                       for c in range(p.new.params.n)]
        self.chunks.append(plan)

    @property
    def done(self) -> set[str]:
        """The prompts prefilled here, their blocks held until Release."""
        return self.holds.held

    def release(self, req_id: str) -> None:
        self.prompt_lps.pop(req_id, None)
        self.looked_up.discard(req_id)
        self.cached_tokens.pop(req_id, None)
        self.holds.release(req_id, self.seqs.pop(req_id, None))

    def abort(self, req_id: str) -> None:
        self.release(req_id)

    def has_work(self) -> bool:
        return bool(self.chunks)

    @property
    def queued_tokens(self) -> int:
        return sum(p.num_tokens for plan in self.chunks for p in plan.pieces)

    @property
    def num_prefilling(self) -> int:
        return len(self.seqs) - len(self.done)

    def _live(self, p) -> bool:
        return p.req_id in self.seqs and p.req_id not in self.done

    def _blocks_needed(self, p) -> int:
        """New blocks a live piece needs (aborted or finished pieces need none)."""
        if not self._live(p):
            return 0
        have = len(self.ex.blocks.blocks_of(self.seqs[p.req_id][0].key))
        return max(0, blocks_for_tokens(p.start + p.num_tokens, self.ex.block_size) - have)

    def _runnable(self, plan: ChunkPlan) -> int:
        """How many leading pieces of `plan` fit the free blocks now."""
        need = 0
        for i, p in enumerate(plan.pieces):
            self._attach_cached(p, need)  # in order: a later piece never pins blocks an earlier one needs
            need += self._blocks_needed(p)
            if need > self.ex.blocks.num_free:
                return i
        return len(plan.pieces)

    def _attach_cached(self, p, keep_free_blocks: int) -> None:
        """A prompt's first piece: attach its cached prefix (once), leaving free the blocks
        the pieces before it need."""
        if self._live(p) and p.req_id not in self.looked_up:
            self.looked_up.add(p.req_id)
            head = self.seqs[p.req_id][0]
            self.cached_tokens[p.req_id] = self.ex.attach_cached_prefix(head, len(head.prompt_ids), keep_free_blocks)

    def step(self) -> ChunkDone | None:
        """Run the next chunk (or its leading pieces that fit), or return None while the pool
        cannot hold even its first piece yet."""
        if not self.chunks:
            return None
        plan = self.chunks[0]
        k = self._runnable(plan)
        if k == 0:  # the head piece is live and waits for blocks (dead pieces need none)
            return None
        pieces, rest = plan.pieces[:k], plan.pieces[k:]
        if rest:
            self.chunks[0] = ChunkPlan(chunk_id=plan.chunk_id, pieces=rest)
        else:
            self.chunks.popleft()
        segments, samplers, failed, last, scored, ran = [], [], [], [], [], []
        for p in pieces:
            if not self._live(p):
                failed.append(p.req_id)  # aborted meanwhile
                continue
            head = self.seqs[p.req_id][0]
            begin, end = head.num_computed, p.start + p.num_tokens  # from the first token without KV here
            if begin < end:
                self.ex.blocks.ensure_capacity(head.key, end)
                self.ex.blocks.check_writable(head.key, begin, end)
                segments.append(Segment(head.prompt_ids[begin:end], begin, self.ex.blocks.blocks_of(head.key),
                                        p.is_last, **score_fields(head.prompt_ids, begin, end - begin, head.params)))
                scored.append(p.req_id)
                head.num_computed = end
                ran.append(head)
            if p.is_last:
                samplers.append(self.seqs[p.req_id])
                last.append(p.req_id)
        finished = self._run(segments, samplers, last, scored) if segments else []
        for head in ran:
            self.ex.commit_computed(head)
        return ChunkDone(worker_id=self.worker_id, chunk_id=plan.chunk_id, finished=finished, failed=failed,
                         partial=bool(rest), evicted_hashes=self.ex.blocks.take_evicted())

    def _run(self, segments, samplers, last, scored) -> list[PrefillResult]:
        self.ex.run(segments, samplers)
        hidden = self.ex.runner.last_hidden
        for req_id, scores in zip(scored, self.ex.runner.last_scores or ()):
            if scores is not None:
                self.prompt_lps.setdefault(req_id, []).extend(scores)
        results = []
        for i, req_id in enumerate(last):
            seqs = self.seqs[req_id]
            self.holds.hold(req_id)
            results.append(PrefillResult(
                req_id=req_id,
                block_ids=list(self.ex.blocks.blocks_of(seqs[0].key)),
                num_prompt_tokens=len(seqs[0].prompt_ids),
                first_tokens=[s.output_ids[0] for s in seqs],
                logprobs=[s.logprobs[0] if s.logprobs else None for s in seqs],
                finish_reasons=[s.finish_reason.value if s.finish_reason else None for s in seqs],
                hidden=hidden[i].float().tolist() if self.collect_hidden and hidden is not None else None,
                prompt_logprobs=self.prompt_lps.pop(req_id, None),
                num_cached_tokens=self.cached_tokens.get(req_id, 0),
            ))
        return results
