"""The KV swap (issue 19 item 5) on the real model code and pools: an MLFQ decode worker whose
pool cannot hold every request preempts; with --swap-space the preempted requests' KV (their
partial last blocks included) goes to the host pool and comes back, and greedy outputs equal
Hugging Face generate token for token, as they do when the same preemptions recompute."""

import random


from tests.engine.tiny_models import hf_greedy_each
from tests.runtime.inproc import Cluster
from tetri.workers.kv_pool import PoolLayout

MAX_TOKENS = 30
rng = random.Random(19)
PROMPTS = [[rng.randrange(5, 400) for _ in range(n)] for n in (21, 27, 18)]  # + 30 tokens: 3-4 blocks each


def _serve(default_model_dir, loaded, mode: str, swap_blocks: int) -> tuple[dict, object]:
    block_gib = PoolLayout.for_model(loaded.spec, 1, 16, loaded.dtype).block_bytes / 2**30
    c = Cluster(default_model_dir, decode_policy="mlfq", decode_blocks=7, loaded=loaded, prefix_caching=False,
                swap_space=swap_blocks * block_gib, preemption_mode=mode)
    for i, p in enumerate(PROMPTS):
        c.submit(f"r{i}", p, max_tokens=MAX_TOKENS)
    for _ in range(2000):
        c.round()
        c.nodes[1].ex.blocks.check_invariants()
        if len(c.finished) == len(PROMPTS):
            break
    c.check()
    assert c.finished == {f"r{i}": "length" for i in range(len(PROMPTS))}
    assert c.blocks_used() == {0: 0, 1: 0}
    return {r: t for r, t in c.tokens.items()}, c.nodes[1]


def test_swapped_out_and_in_requests_decode_exactly_like_hugging_face(default_model_dir, loaded):
    want = hf_greedy_each(default_model_dir, PROMPTS, MAX_TOKENS, ignore_eos=True)
    got, swap_node = _serve(default_model_dir, loaded, "swap", swap_blocks=16)
    core, blocks = swap_node.core, swap_node.ex.blocks
    assert core.swaps > 0 and core.recomputes == 0
    assert blocks.swapped_out_blocks == blocks.swapped_in_blocks > 0 and blocks.host.num_held == 0
    assert swap_node.ex.host_pool.data.shape[0] == 16
    assert core.costs.copy_s_per_block > 0
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
    again, rec_node = _serve(default_model_dir, loaded, "recompute", swap_blocks=16)
    assert rec_node.core.swaps == 0 and rec_node.core.recomputes > 0
    assert again == got  # failed before: a sequence preempted again in the step its re-prefill
    # was planned had that segment run into its freed blocks, which another sequence then held


def test_auto_learns_both_costs_and_a_host_too_small_recomputes(default_model_dir, loaded):
    want = hf_greedy_each(default_model_dir, PROMPTS, MAX_TOKENS, ignore_eos=True)
    got, node = _serve(default_model_dir, loaded, "auto", swap_blocks=16)
    assert node.core.swaps > 0 and node.core.recomputes > 0  # one of each, to measure both
    assert node.core.costs.copy_s_per_block > 0 and node.core.costs.prefill_s_per_token > 0
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
    small, node = _serve(default_model_dir, loaded, "swap", swap_blocks=1)  # no job fits in 1 block
    assert node.core.swaps == 0 and node.core.recomputes > 0 and small == got
