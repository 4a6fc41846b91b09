"""Level-1 (which prefill worker) and level-2 (which decode worker) dispatch, pure code.

Every dispatcher has one method, `pick(loads, req) -> worker_id`, and is built by a factory
that the front scheduler and the simulator both call:

    make_prefill_dispatch(name, rng, prefix_index=None)     least-loaded | round-robin | random | cache-aware
    make_decode_dispatch(name, rng, heavy_decode_tokens=128, fit_aware=True, max_num_seqs=256)
                              round-robin | random | least-loaded | power-of-two | tetri | mixing

Eligibility. A prefill dispatcher considers workers that are `accepting` (state "ready") with
role `prefill` or `mixed`; a decode dispatcher, `accepting` workers with role `decode` or
`mixed`. With none eligible, `pick` raises `NoWorker`. Randomness comes only from the
`random.Random` passed in; candidates are sorted by worker_id first, so a seeded run is
reproducible whatever order the load board lists its rows in.

Footprint (TetriInfer's α test, papers.md §1.4d / §1.11 "the α test"): a request's predicted
decode footprint is `blocks_for_tokens(prompt_tokens + expected_output_tokens(req),
block_size)` with `expected_output_tokens` = the LOW end of the predicted bucket capped by
`max_tokens` (0 without a prediction: the prompt's KV is then all that is known to be
needed), the paper's "estimate resource usage using the predicted range's lower end". A
worker *fits* the request when its `free_blocks` >= that footprint. The blocks already
promised to requests the worker has accepted but not yet admitted are not subtracted: the
board does not publish them, and `waiting_reqs` is used as a load signal instead.

When `fit_aware` (default), every decode dispatcher chooses among the workers that fit (the
set α) and falls back to all eligible workers when α is empty, so no dispatcher picks a
worker that cannot hold the request while another can. `fit_aware=False` makes
round-robin/random the fully load-oblivious baselines.

Decisions on the open points of papers.md §1.11:
- Level-1 load metric: queued (not yet prefilled) prompt tokens; ties -> fewer
  running + waiting requests -> lower worker_id.
- Heavy decode: `expected_output_tokens(req) > heavy_decode_tokens` (default 128, the
  ShareGPT median answer). With bucket width 200 every bucket >= 1 is heavy, bucket 0 light;
  a request without a prediction counts as light.
- `tetri` (TetriDecode), load first. TetriInfer's rule (two at random from α, the lower
  heavy:light ratio wins) ignores how many requests a worker already holds: with plentiful
  memory α is every worker, a worker full of light requests keeps winning, and in the
  simulator (mixed, 100 req/s, 3 decode workers) it got 1.5x another's requests and peaks of
  418 resident against `max_num_seqs` 256 (RESULTS.md finding 3). So:
  * slots: `cap` = the row's `max_num_seqs` (the dispatcher's `max_num_seqs` when the row
    publishes 0); a worker *can admit* the request when it fits (α) and holds fewer than
    `cap` running + waiting requests;
  * load = max((running + waiting) / cap, used blocks / total blocks): the fuller resource;
  * the power-of-two draw is from the workers that can admit; of the two, the lower load
    wins when the loads differ by more than `load_slack` (default 1/32 of a worker: 8 of 256
    slots); within that band the request goes where its own class is scarcer: the lower
    `(heavy_decodes + 1) / (light_decodes + 1)` for a heavy request, `(light_decodes + 1) /
    (heavy_decodes + 1)` for a light one (counting the request; exact fractions), then the
    lower load, more free blocks, lower worker_id. (The paper's `(heavy + h) / (light + 1)`
    for both sends a light request to the worker with the FEWEST heavies, so the light-rich
    worker keeps drawing lights: a feedback loop, not a balance. In the fake-clock stream of
    tests/sched/test_dispatch.py the old rule's heavy-share spread was 4x least-loaded's;
    this rule's is under a seventh of it.)
  * none can admit (every slot full): the least-loaded worker of α (it queues the handoff);
    α empty: the worker with the most free blocks (ties -> fewer running + waiting -> lower
    id), which queues it until memory frees. The request is never refused.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Callable, Protocol

from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.load import ReqInfo, WorkerLoad

PREFILL_DISPATCH = ("least-loaded", "round-robin", "random", "cache-aware")
DECODE_DISPATCH = ("round-robin", "random", "least-loaded", "power-of-two", "tetri", "mixing")
PREFILL_ROLES = ("prefill", "mixed")
DECODE_ROLES = ("decode", "mixed")

# Intelligent Router cost slopes (Llama-2-7B on V100, papers.md §4.2): seconds of prefill per
# prompt token, and seconds added to one decode iteration per request in the batch.
PREFILL_S_PER_TOKEN = 3.2e-4
DECODE_S_PER_BATCHED_REQ = 3.3e-5
MIXING_ALPHA = 0.5


class NoWorker(RuntimeError):
    """No accepting worker of the needed role (the front maps this to HTTP 503)."""


class Dispatcher(Protocol):
    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int: ...


def expected_output_tokens(req: ReqInfo) -> int:
    """Low end of the predicted bucket, capped by max_tokens; 0 without a prediction."""
    if req.predicted_low_tokens is None:
        return 0
    return max(0, min(req.predicted_low_tokens, req.max_tokens))


def is_heavy(req: ReqInfo, heavy_decode_tokens: int = 128) -> bool:
    """A heavy decode: its predicted output (low end, capped) exceeds the threshold."""
    return expected_output_tokens(req) > heavy_decode_tokens


def footprint_blocks(req: ReqInfo, block_size: int) -> int:
    """KV blocks the request is predicted to hold on a decode worker (the α test)."""
    return blocks_for_tokens(req.prompt_tokens + expected_output_tokens(req), block_size)


def fits(load: WorkerLoad, req: ReqInfo) -> bool:
    return load.free_blocks >= footprint_blocks(req, load.block_size)


def _eligible(loads: list[WorkerLoad], roles: tuple[str, ...]) -> list[WorkerLoad]:
    chosen = sorted((w for w in loads if w.accepting and w.role in roles), key=lambda w: w.worker_id)
    if not chosen:
        raise NoWorker(f"no accepting worker with role in {roles}")
    return chosen


def _reqs(load: WorkerLoad) -> int:
    return load.running_reqs + load.waiting_reqs


class _RoundRobin:
    """Cycle through eligible workers by worker_id: the next id above the last one picked,
    wrapping around; survives workers joining, leaving or flipping."""

    def __init__(self, roles: tuple[str, ...], fit_aware: bool = False) -> None:
        self.roles = roles
        self.fit_aware = fit_aware
        self._last_id: int | None = None

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        cands = _eligible(loads, self.roles)
        if self.fit_aware:
            cands = [w for w in cands if fits(w, req)] or cands
        after = [w for w in cands if self._last_id is None or w.worker_id > self._last_id]
        chosen = (after or cands)[0]
        self._last_id = chosen.worker_id
        return chosen.worker_id


class _Random:
    """Uniform choice among eligible workers."""

    def __init__(self, roles: tuple[str, ...], rng: random.Random, fit_aware: bool = False) -> None:
        self.roles = roles
        self.rng = rng
        self.fit_aware = fit_aware

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        cands = _eligible(loads, self.roles)
        if self.fit_aware:
            cands = [w for w in cands if fits(w, req)] or cands
        return self.rng.choice(cands).worker_id


class LeastLoadedPrefill:
    """Level 1: fewest queued prefill tokens; ties -> fewest running + waiting -> lowest id."""

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        cands = _eligible(loads, PREFILL_ROLES)
        return min(cands, key=lambda w: (w.queued_prefill_tokens, _reqs(w), w.worker_id)).worker_id


class CacheAwarePrefill:
    """Level 1 with prefix caching (SGLang's cache-aware router, production-stack's KV-aware
    routing): each eligible worker scores

        score = matched / prompt - beta * queued / prompt

    with `matched` the prompt tokens the `PrefixIndex` expects the worker to hold (its
    leading cached blocks) and `queued` its queued prefill tokens. With beta = 1 (default)
    the best score is the least `queued + (prompt - matched)`: the prefill work ahead of this
    request's first token there, the cached part discounted. Ties -> the least-loaded order.
    When no worker matches at least `min_match` of the prompt (default: one block), or the
    request has no hashes, it is plain least-loaded."""

    def __init__(self, prefix_index, beta: float = 1.0, min_match: float = 0.0) -> None:
        self.index = prefix_index
        self.beta = beta
        self.min_match = min_match
        self.fallback = LeastLoadedPrefill()

    def matched_tokens(self, worker_id: int, req: ReqInfo) -> int:
        return self.index.matched_blocks(worker_id, list(req.prefix_hashes)) * req.prefix_block_tokens

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        cands = _eligible(loads, PREFILL_ROLES)
        prompt = max(1, req.prompt_tokens)
        matched = {w.worker_id: self.matched_tokens(w.worker_id, req) for w in cands} if req.prefix_hashes else {}
        best = max(matched.values(), default=0)
        if best == 0 or best < self.min_match * prompt:
            return self.fallback.pick(loads, req)

        def key(w: WorkerLoad) -> tuple:
            score = matched[w.worker_id] / prompt - self.beta * w.queued_prefill_tokens / prompt
            return (-score, w.queued_prefill_tokens, _reqs(w), w.worker_id)

        return min(cands, key=key).worker_id


class _ScoredDecode:
    """Level 2 base: restrict to α (workers that fit) when any, then minimise `key`."""

    def __init__(self, fit_aware: bool = True) -> None:
        self.fit_aware = fit_aware

    def candidates(self, loads: list[WorkerLoad], req: ReqInfo) -> list[WorkerLoad]:
        cands = _eligible(loads, DECODE_ROLES)
        if not self.fit_aware:
            return cands
        return [w for w in cands if fits(w, req)] or cands

    def key(self, load: WorkerLoad, req: ReqInfo) -> tuple:
        raise NotImplementedError

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        return min(self.candidates(loads, req), key=lambda w: self.key(w, req)).worker_id


class LeastLoadedDecode(_ScoredDecode):
    """Fewest running + waiting requests; ties -> most free blocks -> lowest id (within α)."""

    def key(self, load: WorkerLoad, req: ReqInfo) -> tuple:
        return (_reqs(load), -load.free_blocks, load.worker_id)


class PowerOfTwoDecode(_ScoredDecode):
    """Two distinct workers drawn at random (within α); fewer running + waiting wins, ties ->
    more free blocks -> lower id. One candidate: that one."""

    def __init__(self, rng: random.Random, fit_aware: bool = True) -> None:
        super().__init__(fit_aware)
        self.rng = rng

    def key(self, load: WorkerLoad, req: ReqInfo) -> tuple:
        return (_reqs(load), -load.free_blocks, load.worker_id)

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        cands = self.candidates(loads, req)
        if len(cands) > 2:
            cands = self.rng.sample(cands, 2)
        return min(cands, key=lambda w: self.key(w, req)).worker_id


DEFAULT_MAX_NUM_SEQS = 256
"""Slots per decode worker assumed when its load-board row publishes none (the engine default)."""
LOAD_SLACK = Fraction(1, 32)


def slot_cap(load: WorkerLoad, default: int = DEFAULT_MAX_NUM_SEQS) -> int:
    return load.max_num_seqs if load.max_num_seqs > 0 else default


def load_share(load: WorkerLoad, cap: int) -> Fraction:
    """How full the worker is: the larger of its slot share and its KV-block share."""
    slots = Fraction(_reqs(load), max(1, cap))
    if load.total_blocks <= 0:
        return slots
    return max(slots, Fraction(load.total_blocks - load.free_blocks, load.total_blocks))


def can_admit(load: WorkerLoad, req: ReqInfo, cap: int) -> bool:
    """Fits the request's footprint and has a free slot (running + waiting < cap)."""
    return fits(load, req) and _reqs(load) < cap


class TetriDecode:
    """TetriInfer's level-2 dispatcher made load-aware (the module doc's `tetri` entry): two
    at random from the workers that can admit; the lower load wins, the heavy:light ratio
    breaks near-ties (loads within `load_slack`)."""

    def __init__(self, rng: random.Random, heavy_decode_tokens: int = 128,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, load_slack: Fraction = LOAD_SLACK) -> None:
        self.rng = rng
        self.heavy_decode_tokens = heavy_decode_tokens
        self.max_num_seqs = max_num_seqs
        self.load_slack = Fraction(load_slack)

    def ratio(self, load: WorkerLoad, req: ReqInfo) -> Fraction:
        """The request's own class against the other on this worker, counting the request:
        lower = its class is scarcer here."""
        if is_heavy(req, self.heavy_decode_tokens):
            return Fraction(load.heavy_decodes + 1, load.light_decodes + 1)
        return Fraction(load.light_decodes + 1, load.heavy_decodes + 1)

    def share(self, load: WorkerLoad) -> Fraction:
        return load_share(load, slot_cap(load, self.max_num_seqs))

    def prefer(self, a: WorkerLoad, b: WorkerLoad, req: ReqInfo) -> WorkerLoad:
        """The better of two candidates: load first, heavy:light within the slack band."""
        la, lb = self.share(a), self.share(b)
        if abs(la - lb) > self.load_slack:
            return a if la < lb else b
        return min((a, b), key=lambda w: (self.ratio(w, req), self.share(w), -w.free_blocks, w.worker_id))

    def pick(self, loads: list[WorkerLoad], req: ReqInfo) -> int:
        cands = _eligible(loads, DECODE_ROLES)
        admit = [w for w in cands if can_admit(w, req, slot_cap(w, self.max_num_seqs))]
        if not admit:
            alpha = [w for w in cands if fits(w, req)]
            if alpha:
                return min(alpha, key=lambda w: (self.share(w), -w.free_blocks, w.worker_id)).worker_id
            return min(cands, key=lambda w: (-w.free_blocks, _reqs(w), w.worker_id)).worker_id
        if len(admit) == 1:
            return admit[0].worker_id
        a, b = self.rng.sample(admit, 2)
        return self.prefer(a, b, req).worker_id


def mixing_impact_s(load: WorkerLoad, req: ReqInfo) -> float:
    """Intelligent Router's workload-impact estimate (papers.md §4.4), in seconds:

        n       = running + waiting requests on the worker
        d       = max(1, expected_output_tokens(req))      decode steps the request will run
        D       = the worker's predicted outstanding decode tokens
        overlap = min(D, n * d)      (request, step) pairs the new request shares a batch with
        r_d     = DECODE_S_PER_BATCHED_REQ * (n * d + overlap)
                  = slowdown of the n co-runners over the new request's d steps, plus the new
                    request's own slowdown by the co-runners' remaining tokens
        r_p     = PREFILL_S_PER_TOKEN * prompt_tokens * n  on a `mixed` worker (its prefill
                  stalls every co-running decode), 0 on a decode-only worker
        impact  = MIXING_ALPHA * r_p + (1 - MIXING_ALPHA) * r_d     (α = 0.5 as in the paper)
    """
    n = _reqs(load)
    d = max(1, expected_output_tokens(req))
    overlap = min(load.predicted_decode_tokens, n * d)
    r_d = DECODE_S_PER_BATCHED_REQ * (n * d + overlap)
    r_p = PREFILL_S_PER_TOKEN * req.prompt_tokens * n if load.role == "mixed" else 0.0
    return MIXING_ALPHA * r_p + (1.0 - MIXING_ALPHA) * r_d


class MixingDecode(_ScoredDecode):
    """Route to the least `mixing_impact_s` (within α); ties -> more free blocks -> lower id."""

    def key(self, load: WorkerLoad, req: ReqInfo) -> tuple:
        return (mixing_impact_s(load, req), -load.free_blocks, load.worker_id)


def make_prefill_dispatch(name: str, rng: random.Random, prefix_index=None) -> Dispatcher:
    """Level-1 dispatcher by name (see PREFILL_DISPATCH); `cache-aware` reads `prefix_index`
    (a `tetri.sched.prefix_index.PrefixIndex` the caller keeps up to date; default: a new
    one, its `.index`)."""
    if prefix_index is None:
        from tetri.sched.prefix_index import PrefixIndex

        prefix_index = PrefixIndex()
    builders: dict[str, Callable[[], Dispatcher]] = {
        "least-loaded": LeastLoadedPrefill,
        "round-robin": lambda: _RoundRobin(PREFILL_ROLES),
        "random": lambda: _Random(PREFILL_ROLES, rng),
        "cache-aware": lambda: CacheAwarePrefill(prefix_index),
    }
    if name not in builders:
        raise ValueError(f"prefill dispatch must be one of {PREFILL_DISPATCH}, got {name!r}")
    return builders[name]()


def make_decode_dispatch(name: str, rng: random.Random, heavy_decode_tokens: int = 128,
                         fit_aware: bool = True, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> Dispatcher:
    """Level-2 dispatcher by name (see DECODE_DISPATCH). `fit_aware` does not apply to
    `tetri`, which always filters by α; `max_num_seqs` is `tetri`'s slot count for rows that
    publish none."""
    builders: dict[str, Callable[[], Dispatcher]] = {
        "round-robin": lambda: _RoundRobin(DECODE_ROLES, fit_aware),
        "random": lambda: _Random(DECODE_ROLES, rng, fit_aware),
        "least-loaded": lambda: LeastLoadedDecode(fit_aware),
        "power-of-two": lambda: PowerOfTwoDecode(rng, fit_aware),
        "tetri": lambda: TetriDecode(rng, heavy_decode_tokens, max_num_seqs),
        "mixing": lambda: MixingDecode(fit_aware),
    }
    if name not in builders:
        raise ValueError(f"decode dispatch must be one of {DECODE_DISPATCH}, got {name!r}")
    return builders[name]()
