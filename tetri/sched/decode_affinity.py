"""Level-2 dispatch that prefers the decode worker already holding a request's prefix, pure code.

With prefix caching a decode worker keeps the blocks of what it decoded (prompt and output)
cached after a request ends, so the next turn of a conversation, whose prompt starts with
the previous turn's prompt and answer, needs only its new blocks copied if it lands there
(`tetri.workers.decode`). `PrefixAffinityDecode` wraps any level-2 dispatcher (`inner`, the
load-balancing decision) and moves the request to another worker only when the cache pays
for the load difference. Each decode worker that can admit the request (fits its footprint,
has a free slot: `dispatch.can_admit`) scores

    score = matched / prompt - beta * load

with `matched` the prompt tokens the front's `PrefixIndex` of that decode worker expects it
to cache (its leading full blocks; the index is fed by what the front handed where and what
the workers decoded, corrected by the workers' eviction reports) and `load` the fuller of
its slot and KV-block shares (`dispatch.load_share`, TetriDecode's load). The best score
wins over the inner pick only when some worker matches at least one block and its score is
strictly higher than the inner pick's; otherwise the inner pick stands (the inner
dispatcher always decides first, so its random draws are the same with or without the
wrapper). With `beta` = 8 (default) a whole-prompt match is worth an eighth of a worker's
capacity (32 of 256 slots; TetriDecode's own tie band is 1/32): between workers whose loads
differ by more than that, the cache never overrides the balance.
"""

from __future__ import annotations

from fractions import Fraction

from tetri.sched.dispatch import DECODE_ROLES, DEFAULT_MAX_NUM_SEQS, _eligible, can_admit, load_share, slot_cap
from tetri.sched.load import ReqInfo, WorkerLoad

DECODE_PREFIX_BETA = 8


class PrefixAffinityDecode:
    def __init__(self, inner, prefix_index, beta: int | Fraction = DECODE_PREFIX_BETA,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> None:
        self.inner = inner
        self.index = prefix_index
        self.beta = Fraction(beta)
        self.max_num_seqs = max_num_seqs

    def matched_tokens(self, worker_id: int, req: ReqInfo) -> int:
        return self.index.matched_blocks(worker_id, list(req.prefix_hashes)) * req.prefix_block_tokens

    def score(self, load: WorkerLoad, req: ReqInfo) -> Fraction:
        matched = Fraction(self.matched_tokens(load.worker_id, req), max(1, req.prompt_tokens))
        return matched - self.beta * load_share(load, slot_cap(load, self.max_num_seqs))

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        base = self.inner.pick(loads, req)
        if not req.prefix_hashes:
            return base
        cands = [w for w in _eligible(loads, DECODE_ROLES) if can_admit(w, req, slot_cap(w, self.max_num_seqs))]
        holders = [w for w in cands if self.matched_tokens(w.worker_id, req) > 0]
        if not holders:
            return base
        best = max(holders, key=lambda w: (self.score(w, req), -w.worker_id))
        base_row = next(w for w in loads if w.worker_id == base)
        return best.worker_id if self.score(best, req) > self.score(base_row, req) else base
