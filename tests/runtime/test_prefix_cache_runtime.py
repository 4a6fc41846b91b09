"""Prefix caching on the real model code and pools: outputs with caching on equal caching
off token for token (greedy), the cache really serves the shared prefixes, and aborts,
migrations and flips with shared blocks leak nothing (invariants after every step)."""

import random


from tests.runtime.inproc import Cluster
from tetri.llm import LLM
from tetri.protocol import SetRole
from tetri.sched.front import ReqState
from tetri.sched.prefix_hash import block_hashes
from tetri.types import SamplingParams

rng = random.Random(3)
SYSTEM = [rng.randrange(5, 200) for _ in range(40)]  # a shared 40-token "system prompt"


def conversation(turns: int = 3) -> list[list[int]]:
    """Multi-turn: each prompt is the whole history so far plus a new user turn."""
    r = random.Random(11)
    history, prompts = list(SYSTEM), []
    for _ in range(turns):
        history = history + [r.randrange(5, 200) for _ in range(r.randrange(9, 30))]
        prompts.append(list(history))
        history += [r.randrange(5, 200) for _ in range(7)]  # the "answer", as a dataset holds it
    return prompts


PROMPTS = conversation() + [SYSTEM + [7, 8, 9], SYSTEM[:20] + [1, 2, 3, 4, 5], SYSTEM]


def test_disagg_outputs_equal_with_caching_on_and_off(default_model_dir, loaded):
    runs = {}
    for caching in (True, False):
        c = Cluster(default_model_dir, prefix_caching=caching, loaded=loaded)
        runs[caching] = c.serve_in_order(PROMPTS, max_tokens=4)
        assert c.blocks_used() == {0: 0, 1: 0} and c.front.reqs == {}
        blocks = c.nodes[0].ex.blocks
        if caching:
            # Every prompt after the first reuses the system prompt's 2 full blocks at least;
            # each turn reuses the previous turn's whole history.
            assert blocks.hits >= 16 * 2 * (len(PROMPTS) - 2) and blocks.num_cached > 0
            assert blocks.queries == sum(len(p) for p in PROMPTS)
        else:
            assert blocks.hits == 0 and blocks.num_cached == 0
    assert runs[True] == runs[False]
    assert all(len(t) == 4 for t in runs[True].values())


def test_the_front_starts_chunks_after_the_cached_blocks(default_model_dir, loaded):
    c = Cluster(default_model_dir, loaded=loaded)
    c.submit("a", SYSTEM + [1, 2], max_tokens=2)
    c.run()
    c.submit("b", SYSTEM + [3, 4, 5], max_tokens=2)
    plan = c.to_workers[0][0]
    assert plan.pieces[0].start == 32  # 40 shared tokens: 2 full blocks of 16
    assert c.front.packers[0].queued_tokens + sum(p.num_tokens for p in plan.pieces) == 43 - 32
    c.run()
    assert c.blocks_used() == {0: 0, 1: 0}


def test_evictions_under_a_small_pool_keep_outputs_and_correct_the_index(default_model_dir, loaded):
    """A pool that holds few cached blocks: the front's estimate goes stale, the worker
    computes what it lacks, and outputs still equal caching off."""
    prompts = [SYSTEM + [i] * 50 for i in range(4)] + [SYSTEM + [9]]
    runs = {}
    for caching in (True, False):
        c = Cluster(default_model_dir, num_blocks=12, prefix_caching=caching, loaded=loaded)
        runs[caching] = c.serve_in_order(prompts, max_tokens=4)
        assert c.blocks_used() == {0: 0, 1: 0}
        blocks = c.nodes[0].ex.blocks
        if caching:
            assert blocks.evictions > 0 and blocks.hits > 0
            # the eviction reports reached the front: it indexes no more than the worker caches
            assert c.front.prefix_index.num_blocks(0) == blocks.num_cached
    assert runs[True] == runs[False]


def _warm(c: Cluster) -> None:
    c.submit("warm", SYSTEM + [1, 2, 3], max_tokens=3)
    c.run()
    assert c.nodes[0].ex.blocks.num_cached >= 2


def test_aborts_in_every_state_with_shared_blocks_leak_nothing(default_model_dir, loaded):
    c = Cluster(default_model_dir, loaded=loaded)
    _warm(c)
    long = SYSTEM + list(range(10, 70))
    c.submit("queued", long)
    c.submit("prefilling", long + [1])
    c.deliver(0)
    c.step(0)  # the first chunk ran over the shared blocks
    c.pump_front()
    blocks = c.nodes[0].ex.blocks
    shared = blocks.match(block_hashes(SYSTEM, 16, c.nodes[0].ex.hash_seed))
    assert len(shared) == 2 and blocks.blocks_of("queued/0")[:2] == shared
    assert c.front.reqs["prefilling"].state is ReqState.QUEUED
    c.abort("prefilling")
    c.abort("queued")
    c.run()
    assert c.blocks_used() == {0: 0, 1: 0} and blocks.match(block_hashes(SYSTEM, 16, c.nodes[0].ex.hash_seed)) == shared
    c.submit("awaiting", SYSTEM + [4, 5])
    c.deliver(0)
    c.step(0)
    c.pump_front()
    assert c.front.reqs["awaiting"].state is ReqState.AWAIT_DECODE
    c.abort("awaiting")
    c.submit("decoding", SYSTEM + [6], max_tokens=40)
    for _ in range(6):
        c.round()
    assert c.front.reqs["decoding"].state is ReqState.DECODING
    c.abort("decoding")
    c.run()
    c.check()
    assert c.blocks_used() == {0: 0, 1: 0} and c.front.reqs == {}
    assert c.nodes[0].ex.blocks.hits > 0


def test_migration_off_a_dead_prefill_worker_with_shared_blocks(default_model_dir, loaded):
    c = Cluster(default_model_dir, roles=("prefill", "prefill", "decode"), loaded=loaded)
    _warm(c)
    c.submit("a", SYSTEM + list(range(10, 60)), max_tokens=5)
    wid = c.front.reqs["a"].prefill_worker
    c.deliver(wid)
    c.step(wid)
    c.dead.add(wid)
    c.apply(c.front.on_worker_dead(wid, c.loads(), migrate=True))
    assert c.front.prefix_index.num_blocks(wid) == 0
    c.run()
    c.check()
    assert c.finished.get("a") == "length"
    assert all(v == 0 for v in c.blocks_used().values())


def test_a_flip_drops_the_cache_and_the_worker_serves_its_new_role(default_model_dir, loaded):
    c = Cluster(default_model_dir, loaded=loaded)
    _warm(c)
    node = c.nodes[0]
    assert node.ex.blocks.num_used == 0 and node.ex.blocks.num_cached > 0  # idle: cached blocks are free
    node.handle(SetRole(role="decode"), c.now)
    assert node.role == "decode" and node.ex.blocks.num_cached == 0
    node.ex.blocks.check_invariants()
    node.handle(SetRole(role="prefill"), c.now)
    c.front.prefix_index.forget(0)
    c.submit("after", SYSTEM + [1, 2, 3], max_tokens=3)
    c.run()
    assert c.tokens["after"] == c.tokens["warm"]  # same prompt, recomputed from scratch: same tokens


def test_colocated_llm_outputs_equal_with_caching_on_and_off_under_preemption(default_model_dir):
    prompts = PROMPTS[:3] + [SYSTEM + [i] * 20 for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        # 20 blocks of 16 cannot hold every sequence at once: decodes are preempted and re-prefilled
        llm = LLM(default_model_dir, chunk_size=32, num_blocks=20, check_invariants=True,
                  enable_prefix_caching=caching)
        outs[caching] = [o.token_ids for o in llm.generate(prompts, params)]
        n2 = llm.generate([SYSTEM + [5, 6]], SamplingParams(max_tokens=8, temperature=0.0, n=2, ignore_eos=True))
        outs[caching].append(n2[0].token_ids)
        blocks = llm.executor.blocks
        assert blocks.num_used == 0
        assert (blocks.hits > 0) == caching
        llm.close()
    assert outs[True] == outs[False]


def test_host_staged_stamps_name_a_shared_blocks_content_not_its_last_stager():
    """Two requests sharing a cached block both stage it: its stamp must satisfy either."""
    from tetri.workers.kv_stage import block_stamps, stamp_of

    seed = b"s" * 32
    a = block_stamps("a", SYSTEM + [1, 2], 16, seed, caching=True)
    b = block_stamps("b", SYSTEM + [3], 16, seed, caching=True)
    assert a[:2] == b[:2] and a[2] == stamp_of("a", 42) and b[2] == stamp_of("b", 41)
    assert block_stamps("a", SYSTEM + [1, 2], 16, seed, caching=False) == [stamp_of("a", 42)] * 3


def test_colocated_cache_aware_dispatch_sends_each_turn_where_its_history_is_cached(default_model_dir, loaded):
    """Mixed workers: the front indexes what a mixed worker prefilled (at its first token) and
    decoded (at its end), and corrects it by the worker's eviction reports, so cache-aware
    level 1 sends each turn to the worker holding the conversation; least-loaded does not."""
    prompts = conversation(3)
    placed, hits, outputs = {}, {}, {}
    for policy in ("cache-aware", "least-loaded"):
        c = Cluster(default_model_dir, roles=("mixed", "mixed"), global_policy=policy, loaded=loaded)
        c.submit("busy", [3] * 30, max_tokens=4)
        c.deliver(0)  # worker 0 is busy: turn one goes to worker 1
        placed[policy] = []
        for i, p in enumerate(prompts):
            c.submit(f"t{i}", p, max_tokens=6)
            placed[policy].append(c.front.reqs[f"t{i}"].prefill_worker)
            c.run()
            # the index holds no more than the worker caches, evictions reported
            assert c.front.prefix_index.num_blocks(1) <= c.nodes[1].ex.blocks.num_cached
        assert c.blocks_used() == {0: 0, 1: 0} and c.front.reqs == {}
        hits[policy] = sum(n.ex.blocks.hits for n in c.nodes.values())
        outputs[policy] = {r: t for r, t in c.tokens.items() if r != "busy"}
    assert placed["cache-aware"] == [1, 1, 1]
    assert placed["least-loaded"] == [1, 0, 0]
    assert hits["cache-aware"] > hits["least-loaded"]
    assert outputs["cache-aware"] == outputs["least-loaded"]
