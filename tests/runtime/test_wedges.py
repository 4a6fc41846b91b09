"""Nothing wedges on a tiny KV pool (issue 20, item 1), on the real model and pools:
max_model_len is capped by the pool, the offline engine returns, a mixed worker ends what it
cannot fit instead of cycling, and a prefill worker never waits on blocks it can never get."""

import threading

import pytest

from tests.runtime.inproc import Cluster
from tetri import LLM, SamplingParams
from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.protocol import SubmitMixed, TokenBatch, WorkerError
from tetri.sched.front import ReqState
from tetri.workers.executor import Executor
from tetri.workers.node import WorkerNode

PROMPT10 = list(range(20, 30))


def _generate_within(llm, prompts, params, timeout_s=120.0):
    """Run llm.generate in a thread: a wedged engine fails the test instead of hanging it."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", llm.generate(prompts, params)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "LLM.generate never returned"
    return out["r"]


def test_max_model_len_is_capped_by_the_pool_and_a_useless_pool_is_refused(default_model_dir):
    ex = Executor(ModelConfig(model=default_model_dir, max_model_len=4096), CacheConfig(num_blocks=4))
    assert ex.max_model_len == 64  # 4 blocks of 16: what one request can hold
    ex.close()
    with pytest.raises(ValueError, match="too few for even a 2-token request"):
        Executor(ModelConfig(model=default_model_dir), CacheConfig(num_blocks=1, block_size=1))


def test_offline_generate_returns_on_a_four_block_pool(default_model_dir):
    """The issue's reproduction: 4 blocks, a 10-token prompt, max_tokens=100 used to stick at
    55 tokens (preempt, re-prefill, preempt ...). It ends at the pool's length instead, with
    the tokens a roomy engine produces."""
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    tiny = LLM(default_model_dir, num_blocks=4, check_invariants=True)
    got = _generate_within(tiny, [PROMPT10], params)[0]
    want = LLM(default_model_dir).generate([PROMPT10], params)[0]
    assert (got.finish_reason, len(got.token_ids)) == ("length", 64 - len(PROMPT10))
    assert got.token_ids == want.token_ids[: len(got.token_ids)]


@pytest.mark.parametrize("num_blocks,chunk_size,reqs", [
    (4, 32, [(28, 26, 1), (21, 29, 1)]),  # each fits alone; together they used to cycle forever
    (7, 64, [(47, 6, 2), (6, 104, 2)]),  # forking a choice used to raise OutOfBlocks (a dead worker)
])
def test_requests_that_fit_alone_all_finish_on_a_pool_too_small_for_all_at_once(
        default_model_dir, num_blocks, chunk_size, reqs):
    """(prompt, max_tokens, n) sets found by a random search that wedged or crashed the old
    core: the most senior sequence is never preempted for a junior one, and a prefill
    reserves its forks' blocks, so every request finishes with a roomy engine's tokens."""
    prompts = [list(range(5, 5 + p)) for p, _, _ in reqs]
    params = [SamplingParams(n=n, max_tokens=m, temperature=0.0, ignore_eos=True) for _, m, n in reqs]
    tiny = LLM(default_model_dir, num_blocks=num_blocks, chunk_size=chunk_size, check_invariants=True)
    got = _generate_within(tiny, prompts, params)
    want = LLM(default_model_dir).generate(prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in want]
    assert tiny.executor.blocks.num_used == 0


def test_mixed_worker_ends_a_request_it_cannot_fit_with_an_error(default_model_dir):
    """With the pool cap lifted, a request that outgrows the whole pool ends with a clear
    WorkerError naming the pool instead of cycling through preemption forever."""
    ex = Executor(ModelConfig(model=default_model_dir), CacheConfig(num_blocks=4))
    ex.max_model_len = 4096  # what the executor used to allow
    node = WorkerNode(0, "mixed", ex, EngineSchedConfig(chunk_size=16))
    node.handle(SubmitMixed(req_id="big", prompt_token_ids=PROMPT10,
                            params=SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)), 0.0)
    out, tokens = [], 0
    for _ in range(300):
        if not node.has_work():
            break
        msgs = node.step(0.0)
        out.extend(m for m in msgs if isinstance(m, WorkerError))
        tokens += sum(len(m.token_ids) for m in msgs if isinstance(m, TokenBatch))
    assert not node.has_work(), "the mixed worker kept cycling"
    assert [e.req_id for e in out] == ["big"] and "KV blocks" in out[0].message
    assert tokens == 64 - len(PROMPT10) + 1  # as far as the pool allowed (the last token needs no slot)
    assert ex.blocks.num_used == 0


def test_a_chunk_that_never_fits_whole_runs_in_parts(default_model_dir):
    """Pieces of two prompts share a chunk that needs 5 blocks of a 4-block prefill pool,
    though each prompt fits alone: the worker runs what fits and the rest after."""
    c = Cluster(default_model_dir, num_blocks=4, chunk_size=64)
    c.submit("a", list(range(10, 70)), max_tokens=4)  # 60 tokens: 4 blocks
    c.submit("b", list(range(70, 90)), max_tokens=4)  # chunk 1 = a[0:60] + b[0:4]
    c.run()
    assert c.finished == {"a": "length", "b": "length"} and c.failed == {}
    assert c.blocks_used() == {0: 0, 1: 0}


def test_aborting_a_prompt_that_never_fits_unwedges_the_prefill_worker(default_model_dir):
    """A prompt larger than the prefill pool (the front's 400 is not in this harness) waits at
    the head of the worker's queue; once aborted its pieces need no blocks, so the request
    behind it is served."""
    c = Cluster(default_model_dir, num_blocks=4, chunk_size=16)
    c.submit("huge", list(range(10, 110)))  # 100 tokens: 7 blocks > 4
    for _ in range(20):
        c.round()
    assert c.front.reqs["huge"].state is ReqState.PREFILLING
    c.abort("huge")
    c.submit("next", list(range(10, 20)), max_tokens=4)
    c.run()
    assert c.finished == {"next": "length"}
    assert c.blocks_used() == {0: 0, 1: 0} and c.front.reqs == {}
