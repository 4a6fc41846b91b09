"""Prefix caching on decode workers, on the real model code and pools (the in-process
cluster: real nodes, the real front, messages routed by hand; every block invariant checked
after every step): a conversation's later turns copy only the blocks the decode worker
lacks, outputs equal caching off token for token, shared decode-side blocks survive aborts
mid-handoff, single-choice aborts and preemption, level 2 sends a conversation back to the
worker holding it, and every block is free when idle."""

import random


from tests.runtime.inproc import Cluster
from tetri.sched.front import ReqState
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.prefix_hash import block_hashes

BS = 16


def converse(c: Cluster, name: str, turns: int, seed: int, max_tokens: int = 10) -> list[list[int]]:
    """Turn t's prompt: the whole history (earlier prompts and the answers served) + new tokens."""
    r = random.Random(seed)
    history, prompts = [r.randrange(5, 200) for _ in range(40)], []
    for t in range(turns):
        history = history + [r.randrange(5, 200) for _ in range(r.randrange(9, 30))]
        prompts.append(list(history))
        c.submit(f"{name}{t}", history, max_tokens=max_tokens)
        c.run()
        history = history + c.tokens[f"{name}{t}"]
    return prompts


def test_a_conversation_copies_only_the_blocks_its_decode_worker_lacks(default_model_dir, loaded):
    outs, prompts = {}, None
    for caching in (True, False):
        c = Cluster(default_model_dir, chunk_size=64, prefix_caching=caching, loaded=loaded)
        prompts = converse(c, "t", 3, seed=5)
        outs[caching] = dict(c.tokens)
        core, blocks = c.nodes[1].core, c.nodes[1].ex.blocks
        copied = sum(blocks_for_tokens(len(p), BS) for p in prompts)
        assert c.blocks_used() == {0: 0, 1: 0} and c.front.reqs == {}
        if not caching:
            assert (core.handoff_blocks_copied, core.handoff_blocks_cached, blocks.num_cached) == (copied, 0, 0)
            continue
        # Turn t+1 finds turn t's prompt and all but its last output's KV cached: the full
        # blocks of len(prompt) + 10 - 1 tokens, computed here and kept after turn t ended.
        cached = sum((len(p) + 10 - 1) // BS for p in prompts[:-1])
        assert cached > 0 and core.handoff_blocks_cached == cached
        assert core.handoff_blocks_copied == copied - cached
        assert blocks.hits == cached * BS and blocks.queries == sum(len(p) for p in prompts)
        # the front's index of the decode worker is what it really caches
        assert c.front.decode_index.num_blocks(1) == blocks.num_cached == (len(prompts[-1]) + 9) // BS
        assert c.loads()[1].handoff_blocks_cached == cached
    assert outs[True] == outs[False]
    assert all(len(t) == 10 for t in outs[True].values())


def test_shared_decode_blocks_survive_aborts_mid_handoff_and_of_one_choice(default_model_dir, loaded):
    c = Cluster(default_model_dir, loaded=loaded)
    warm = converse(c, "w", 1, seed=7)[0] + c.tokens["w0"]  # cached on the decode worker now
    dec = c.nodes[1].ex.blocks
    k = (len(warm) - 1) // BS
    # "gone" is aborted mid-handoff: the decode worker got its Handoff but never admitted it
    c.submit("gone", warm + [3, 4, 5], max_tokens=8)
    while c.front.reqs["gone"].state is not ReqState.AWAIT_DECODE:
        c.round()
    c.abort("gone")
    c.run()
    assert c.front.reqs == {} and c.nodes[1].core.handoff_blocks_cached == 0
    # two requests and two choices share the cached blocks on the decode worker
    c.submit("a", warm + [1, 2], max_tokens=12, n=2)
    c.submit("b", warm + [6], max_tokens=12)
    while not {"a/0", "a/1", "b/0"} <= set(dec.owners()):
        c.round()
    shared = dec.blocks_of("b/0")[:k]
    assert dec.blocks_of("a/0")[:k] == dec.blocks_of("a/1")[:k] == shared and len(shared) == k
    assert c.nodes[1].core.handoff_blocks_cached == 3 * k
    c.apply(c.front.abort("a", choice=1))
    c.round()
    assert "a/1" not in dec.owners() and dec.blocks_of("a/0")[:k] == shared
    c.abort("a")
    c.run()
    assert c.blocks_used() == {0: 0, 1: 0} and c.front.reqs == {}
    assert dec.match(block_hashes(warm, BS, c.nodes[1].ex.hash_seed)) == shared  # still cached, unheld
    # "b" went on over the shared blocks: the same tokens as alone with caching off
    ref = Cluster(default_model_dir, prefix_caching=False, loaded=loaded)
    ref.submit("b", warm + [6], max_tokens=12)
    ref.run()
    assert c.tokens["b"] == ref.tokens["b"] and c.finished["b"] == "length"


def test_preemption_and_evictions_on_a_small_decode_pool(default_model_dir, loaded):
    """Interleaved conversations on a decode pool too small for them: decodes are preempted
    and re-prefilled over their cached blocks, cached blocks are evicted, the front's index
    follows the eviction reports, and outputs still equal caching off."""
    outs = {}
    for caching in (True, False):
        c = Cluster(default_model_dir, chunk_size=64, decode_blocks=12, prefix_caching=caching, loaded=loaded)
        histories = {n: [random.Random(n).randrange(5, 200) for _ in range(60)] for n in range(3)}
        for turn in range(2):
            for n, h in histories.items():
                c.submit(f"c{n}t{turn}", h + [turn + 1] * 5, max_tokens=16)
            c.run()
            for n in histories:
                histories[n] += [turn + 1] * 5 + c.tokens[f"c{n}t{turn}"]
        outs[caching] = dict(c.tokens)
        blocks = c.nodes[1].ex.blocks
        assert c.blocks_used() == {0: 0, 1: 0}
        if caching:
            assert blocks.evictions > 0 and c.nodes[1].core.handoff_blocks_cached > 0
            # preempted decodes were re-prefilled over cached blocks too, not only handoffs
            assert blocks.hits > c.nodes[1].core.handoff_blocks_cached * BS
            assert c.front.decode_index.num_blocks(1) <= blocks.num_cached
    assert outs[True] == outs[False]


def test_level2_sends_a_conversation_back_to_the_decode_worker_holding_it(default_model_dir, loaded):
    picked = {}
    for caching in (True, False):
        c = Cluster(default_model_dir, roles=("prefill", "decode", "decode"), dispatch_policy="round-robin",
                    prefix_caching=caching, loaded=loaded)
        seen = []
        r = random.Random(2)
        history = [r.randrange(5, 200) for _ in range(50)]
        for t in range(3):
            history = history + [r.randrange(5, 200) for _ in range(20)]
            c.submit(f"t{t}", history, max_tokens=6)
            seen.append(c.front.reqs[f"t{t}"])
            c.run()
            history = history + c.tokens[f"t{t}"]
        picked[caching] = [req.decode_worker for req in seen]
        cached = sum(c.nodes[w].core.handoff_blocks_cached for w in (1, 2))
        assert (cached > 0) == caching
    assert picked[False] == [1, 2, 1]  # round-robin alone
    assert picked[True] == [1, 1, 1]  # the holder, loads being equal
