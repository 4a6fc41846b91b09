"""The KV swap (issue 19 item 5) on the real model code and pools: an MLFQ decode worker whose
pool cannot hold every request preempts; with --swap-space the preempted requests' KV (their
partial last blocks included) goes to the host pool and comes back, and greedy outputs equal
Hugging Face generate token for token, as they do when the same preemptions recompute."""

import random

import pytest

from tests.engine.tiny_models import hf_greedy_each
from tests.runtime.inproc import Cluster
from tetri.workers.kv_pool import PoolLayout

MAX_TOKENS = 30
rng = random.Random(19)
PROMPTS = [[rng.randrange(5, 400) for _ in range(n)] for n in (21, 27, 18)]  # + 30 tokens: 3-4 blocks each


@pytest.fixture(scope="module")
def want(default_model_dir) -> list[list[int]]:
    """Hugging Face `generate`'s greedy outputs for PROMPTS (the oracle), computed once."""
    return hf_greedy_each(default_model_dir, PROMPTS, MAX_TOKENS, ignore_eos=True)


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


def test_swapped_out_and_in_requests_decode_exactly_like_hugging_face(default_model_dir, loaded, want):
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


def test_auto_learns_both_costs_and_a_host_too_small_recomputes(default_model_dir, loaded, want):
    got, node = _serve(default_model_dir, loaded, "auto", swap_blocks=16)
    assert node.core.swaps > 0 and node.core.recomputes > 0  # one of each, to measure both
    assert node.core.costs.copy_s_per_block > 0 and node.core.costs.prefill_s_per_token > 0
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == want
    small, node = _serve(default_model_dir, loaded, "swap", swap_blocks=1)  # no job fits in 1 block
    assert node.core.swaps == 0 and node.core.recomputes > 0 and small == got


class _HeldEvent:
    """A fake copy event: the copy itself already ran (on CPU), but the host is told it is
    done only once the test releases it or someone waits on it (as a CUDA event would be)."""

    def __init__(self, on_wait=None) -> None:
        self.released = False
        self.ordered = False  # the worker's stream was made to wait for it
        self.on_wait = on_wait

    def done(self) -> bool:
        return self.released

    def wait(self) -> None:
        if self.on_wait is not None:
            self.on_wait()
        self.released = True


class _HeldSwapper:
    """The executor's real `SwapCopier` (the data moves at once) whose completions are
    `_HeldEvent`s; `release_out`: swap-outs complete at once (only uploads are held)."""

    def __init__(self, real, on_wait=None, release_out: bool = False) -> None:
        self.real, self.on_wait, self.release_out, self.events = real, on_wait, release_out, []

    def copy(self, src_ids, dst_ids, to_host):
        from tetri.workers.kv_swap import SwapCopy

        real = self.real.copy(src_ids, dst_ids, to_host)
        event = _HeldEvent(self.on_wait)
        event.released = to_host and self.release_out
        self.events.append(event)
        return SwapCopy(event, real.num_blocks, real.seconds, lambda: setattr(event, "ordered", True))


def _swap_cluster(default_model_dir, loaded) -> Cluster:
    block_gib = PoolLayout.for_model(loaded.spec, 1, 16, loaded.dtype).block_bytes / 2**30
    return Cluster(default_model_dir, decode_policy="mlfq", decode_blocks=7, loaded=loaded, prefix_caching=False,
                   swap_space=16 * block_gib, preemption_mode="swap")


def test_a_swapped_in_request_steps_only_once_its_copy_event_completed(default_model_dir, loaded, want):
    """Every swap copy's event completes only 3 rounds after it started. Meanwhile a swapped-out
    sequence's pool blocks are free but the worker's stream waits for the copy, and it is not
    swapped back in; a swapped-in one neither runs nor gets a token. Outputs stay exact."""
    c = _swap_cluster(default_model_dir, loaded)
    node = c.nodes[1]
    core, blocks = node.core, node.ex.blocks
    held = node.ex.swapper = _HeldSwapper(node.ex.swapper)
    for i, p in enumerate(PROMPTS):
        c.submit(f"r{i}", p, max_tokens=MAX_TOKENS)
    started: dict[int, int] = {}
    seen = {True: 0, False: 0}
    for rnd in range(2000):
        for event in held.events:
            started.setdefault(id(event), rnd)
            if rnd - started[id(event)] >= 3:
                event.released = True
        before = {r: len(t) for r, t in c.tokens.items()}
        pending = {k: f.to_host for k, f in core.swap_copies._by_key.items()}
        c.round()
        for key, to_host in pending.items():
            flight = core.swap_copies._by_key.get(key)
            if flight is None or flight.to_host != to_host:
                continue  # landed in this round
            seen[to_host] += 1
            seq = core.swapped[key]
            assert key not in core.running
            if to_host:
                assert not blocks.blocks_of(key) and blocks.swapped_blocks(key) and flight.copy.completion.ordered
            else:
                assert len(c.tokens[seq.req_id]) == before[seq.req_id], "stepped before its upload completed"
        if len(c.finished) == len(PROMPTS):
            break
    assert seen[True] > 0 and seen[False] > 0, seen  # both kinds were observed in flight
    assert c.finished == {f"r{i}": "length" for i in range(len(PROMPTS))}
    assert c.blocks_used() == {0: 0, 1: 0} and blocks.host.num_held == 0 and len(core.swap_copies) == 0
    assert [c.tokens[f"r{i}"] for i in range(len(PROMPTS))] == want


def test_an_abort_waits_for_the_upload_in_flight_before_freeing(default_model_dir, loaded):
    c = _swap_cluster(default_model_dir, loaded)
    node = c.nodes[1]
    core, blocks = node.core, node.ex.blocks
    at_wait = []
    node.ex.swapper = _HeldSwapper(node.ex.swapper, release_out=True, on_wait=lambda: at_wait.append(
        {k: (len(blocks.blocks_of(k)), blocks.swapped_blocks(k)) for k in core.swapped}))
    for i, p in enumerate(PROMPTS):
        c.submit(f"r{i}", p, max_tokens=MAX_TOKENS)
    for _ in range(2000):  # no upload's event is released: the first swap-in stays in flight
        c.round()
        if core.swap_copies:
            break
    (key,) = core.swap_copies._by_key
    assert not core.swap_copies._by_key[key].to_host
    owned, host = len(blocks.blocks_of(key)), blocks.swapped_blocks(key)
    assert owned > 0 and host == owned  # the upload writes its pool blocks from its host blocks
    c.abort(key.split("/")[0])
    c.deliver(1)
    assert at_wait and at_wait[0][key] == (owned, host)  # waited with both still held
    assert key not in core.swapped and key not in core.running
    assert not blocks.blocks_of(key) and blocks.swapped_blocks(key) == 0
    blocks.check_invariants()


def _serve_mixed(default_model_dir, loaded, mode: str) -> tuple[dict, object]:
    block_gib = PoolLayout.for_model(loaded.spec, 1, 16, loaded.dtype).block_bytes / 2**30
    c = Cluster(default_model_dir, roles=("mixed",), decode_blocks=7, loaded=loaded, prefix_caching=False,
                swap_space=16 * block_gib, preemption_mode=mode)
    for i, p in enumerate(PROMPTS):
        c.submit(f"r{i}", p, max_tokens=MAX_TOKENS)
    c.run(max_rounds=2000)
    assert c.finished == {f"r{i}": "length" for i in range(len(PROMPTS))}
    node = c.nodes[0]
    assert c.blocks_used() == {0: 0} and node.ex.blocks.host.num_held == 0 and not node.core.swapped
    fields = node.board_fields()
    assert (fields["preemptions_swap"], fields["preemptions_recompute"]) == (node.core.swaps, node.core.recomputes)
    return [c.tokens[f"r{i}"] for i in range(len(PROMPTS))], node


def test_a_mixed_worker_swaps_like_a_decode_worker(default_model_dir, loaded, want):
    """The colocated role's preemptions go the same way: swapped out and back in (the mode
    reaches the mixed core: no recompute), outputs as Hugging Face's."""
    got, node = _serve_mixed(default_model_dir, loaded, "swap")
    blocks = node.ex.blocks
    assert node.core.swaps > 0 and node.core.recomputes == 0
    assert blocks.swapped_out_blocks == blocks.swapped_in_blocks > 0 and node.core.costs.copy_s_per_block > 0
    assert got == want
