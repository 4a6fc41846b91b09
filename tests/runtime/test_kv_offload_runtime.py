"""The prefix cache's host tier (`--kv-offloading-size`) on the real model code and pools: a
GPU pool too small to keep a prompt's blocks cached offloads them to the host pool on
eviction, a later request uploads them instead of recomputing, and greedy outputs equal
caching off token for token; the real server threads the flag and reports the counters."""

import random


from tests.runtime.inproc import Cluster
from tests.runtime.server_proc import ServerProc
from tetri.config import CacheConfig, ModelConfig
from tetri.protocol import ChunkPlan, NewReq, PlanPiece
from tetri.types import SamplingParams
from tetri.workers.executor import Executor
from tetri.workers.kv_pool import PoolLayout
from tetri.workers.prefill import PrefillCore

rng = random.Random(5)
SYSTEM = [rng.randrange(5, 200) for _ in range(70)]  # 4 full blocks of 16 (+6)
# Each "filler" caches 7 of the 12 blocks: two of them evict every cached block of SYSTEM.
PROMPTS = [SYSTEM + [1, 2]] + [[rng.randrange(5, 200) for _ in range(120)] for _ in range(2)] + [SYSTEM + [3]]


def test_an_evicted_prefix_is_uploaded_from_the_host_tier_and_outputs_match(default_model_dir, loaded):
    block_gib = PoolLayout.for_model(loaded.spec, 1, 16, loaded.dtype).block_bytes / 2**30
    runs, prefill_blocks = {}, {}
    for name, caching, host_gib in (("off", False, 0.0), ("gpu", True, 0.0), ("host", True, 32 * block_gib)):
        c = Cluster(default_model_dir, num_blocks=12, prefix_caching=caching, kv_offloading_size=host_gib,
                    loaded=loaded)
        runs[name] = c.serve_in_order(PROMPTS, max_tokens=5)
        assert c.blocks_used() == {0: 0, 1: 0} and c.front.reqs == {}
        prefill_blocks[name] = c.nodes[0].ex.blocks
        if name == "host":
            assert c.nodes[0].ex.host_pool.data.shape[0] == 32
    gpu, host = prefill_blocks["gpu"], prefill_blocks["host"]
    assert gpu.evictions > 0 and gpu.hits == 0  # the small pool alone: the repeat recomputes
    assert host.offloaded_blocks >= 4 and host.uploaded_blocks == 4
    assert host.hits == host.host_hits == 4 * 16  # the repeat's 4 full blocks, all from the host
    assert runs["host"] == runs["gpu"] == runs["off"]
    assert all(len(t) == 5 for t in runs["host"].values())


def test_a_later_pieces_cache_hit_never_takes_the_blocks_an_earlier_piece_needs(default_model_dir, loaded):
    """Found while building the tier (GPU-only, on main too): a chunk's second piece attached
    the only free (cached, unheld) blocks, so the first piece, told it fit, hit OutOfBlocks.
    The lookup now leaves free the blocks the pieces before it need."""
    ex = Executor(ModelConfig(model=default_model_dir), CacheConfig(num_blocks=8), loaded=loaded)
    core = PrefillCore(ex, 0)
    params = SamplingParams(max_tokens=2, temperature=0.0)

    def piece(req_id, prompt, start=0):
        return PlanPiece(req_id=req_id, start=start, num_tokens=len(prompt) - start, is_last=True,
                         new=NewReq(prompt_token_ids=prompt, params=params))
    shared = [7 + i % 90 for i in range(81)]
    core.submit(ChunkPlan(chunk_id=0, pieces=[piece("w", shared)]))
    assert core.step().finished
    core.release("w")  # 5 cached unheld blocks, 3 uncached free ones
    core.submit(ChunkPlan(chunk_id=1, pieces=[piece("h", [3] * 40)]))
    core.step()  # "h" holds the 3: every free block left is a cached one of `shared`
    assert ex.blocks.num_free == 5
    fresh = [200 + i % 50 for i in range(65)]  # 5 blocks, nothing cached
    core.submit(ChunkPlan(chunk_id=2, pieces=[piece("a", fresh), piece("b", shared, start=80)]))
    done = core.step()  # used to raise OutOfBlocks: "b" attached the 5 blocks "a" was counted on
    assert [r.req_id for r in done.finished] == ["a"] and done.partial
    ex.blocks.check_invariants()
    core.release("a")
    core.release("h")
    assert [r.req_id for r in core.step().finished] == ["b"]  # it computes what it lacks
    core.release("b")
    assert ex.blocks.num_used == 0
    ex.close()


def test_the_server_threads_the_flag_and_reports_host_hits(default_model_dir):
    """A real server (one colocated worker: the mixed core's path; the disaggregated prefill
    path is the test above) with a tiny pool (131 blocks) and a 64-block host tier: the repeat
    of an evicted prompt is served from the host tier and answers the same tokens."""
    srv = ServerProc("--device", "cpu", "--mode", "colocated", "--workers", "1", "--kv-cache-gb", "0.002",
                     "--kv-offloading-size", str(64 * 16384 / 2**30), "--chunk-size", "256").start()
    try:
        client = srv.openai()
        model = client.models.list().data[0].id
        r = random.Random(9)
        first = [r.randrange(4, 500) for _ in range(600)]
        fillers = [[r.randrange(4, 500) for _ in range(900)] for _ in range(2)]

        def complete(prompt):
            out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0.0)
            return out.choices[0].text

        want = complete(first)
        for f in fillers:
            complete(f)  # 2 x 57 blocks + 38 of the first's: the first's cached blocks are evicted
        assert complete(first) == want
        (row,) = srv.workers()
        assert row["kv_offloaded_blocks"] > 0 and row["kv_uploaded_blocks"] > 0
        assert 0 < row["host_prefix_cache_hits"] <= row["prefix_cache_hits"]
        status, text = srv.get("/metrics")
        assert status == 200 and "tetri:host_prefix_cache_hits" in text and "tetri:kv_uploaded_blocks" in text
    finally:
        srv.stop()
