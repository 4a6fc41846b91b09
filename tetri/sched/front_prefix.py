"""What the front's prefix indexes learn from a request's life, as functions of a
`FrontScheduler` (`sched`), pure code: a mixed worker's prefill (level 1's index, at the
first token) and what a decode or mixed worker decoded (at the request's end). The prefill
workers' entries are added when their prefill finishes (`Lifecycle.prefilled`), the
decode workers' when a handoff's copy lands (`on_kv_copied`); every worker's eviction
reports correct them (`on_token_batch`, `on_kv_copied`, `chunk_done`); `tetri.sched.handoff`
calls these at the events."""

from __future__ import annotations

from tetri.sched.front_types import FrontReq
from tetri.sched.prefix_hash import extend_block_hashes


def index_mixed_prefill(sched, req: FrontReq) -> None:
    """The first token of a request a mixed worker prefilled: its context's full blocks are
    cached there now."""
    if sched.cfg.prefix_caching and req.block_hashes is not None and req.prefill_worker == req.decode_worker:
        sched.prefix_index.add(req.prefill_worker, req.block_hashes)


def index_decoded(sched, req: FrontReq) -> None:
    """A request that decoded on a decode or mixed worker ended: the full blocks of what it
    computed there (context and choice 0's outputs but the last) stay cached there."""
    if not sched.cfg.prefix_caching or req.block_hashes is None or req.decode_worker is None:
        return
    tokens = req.prompt_token_ids + req.output_ids
    hashes = extend_block_hashes(list(req.block_hashes), tokens, req.hash_block_tokens, sched.cfg.prefix_hash_seed,
                                 len(tokens) - 1)
    index = sched.prefix_index if req.decode_worker == req.prefill_worker else sched.decode_index  # mixed: level 1's
    index.add(req.decode_worker, hashes[len(req.block_hashes):])
