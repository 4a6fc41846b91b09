"""Pure logic of the KV handoff: path selection, run coalescing, the in-flight bookkeeping, stamps,
the allocator setting, and the supervisor's restart decision."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.transfer.fake_completion import FakeCompletion
from tetri.protocol import PoolInfo
from tetri.workers.cuda_ipc import forced_alloc_conf
from tetri.workers.kv_pool import _runs
from tetri.workers.kv_stage import stamp_of
from tetri.workers.kv_transfer import PATHS, InflightCopies, InflightCopy, PeerFacts, candidate_paths


def info(**kw) -> PoolInfo:
    return PoolInfo(num_blocks=8, num_layers=2, block_size=16, num_kv_heads=2, head_dim=32, dtype="float32",
                    canary=b"c" * 16, owner_pid=1, **kw)


CPU_POOL = dict(shm_name="tetri-kv-a", stage_shm="tetri-kvstage-a")
CUDA_POOL = dict(cuda_ipc=b"h" * 64, device_uuid=b"u" * 16, stage_shm="tetri-kvstage-a")


@pytest.mark.parametrize("pool, facts, paths, reason", [
    (CPU_POOL, PeerFacts(), ["shm", "host_staged"], None),
    (CPU_POOL, PeerFacts(same_process=True), ["local", "shm", "host_staged"], None),
    (CUDA_POOL, PeerFacts(cuda_here=True, peer_gpu=0, same_gpu=True), ["cuda_ipc", "host_staged"], None),
    (CUDA_POOL, PeerFacts(cuda_here=True, peer_gpu=1, peer_access=True), ["cuda_ipc_p2p", "host_staged"], None),
    (CUDA_POOL, PeerFacts(cuda_here=True, peer_gpu=1), ["host_staged"], "no peer access"),
    (CUDA_POOL, PeerFacts(cuda_here=True), ["host_staged"], "not visible here"),
    (CUDA_POOL, PeerFacts(), ["host_staged"], "this worker has no GPU"),
    (dict(export_error="cuIpcGetMemHandle failed", stage_shm="s"), PeerFacts(cuda_here=True), ["host_staged"],
     "cuIpcGetMemHandle failed"),
    (dict(cuda_ipc=b"h" * 64, device_uuid=b"u" * 16), PeerFacts(cuda_here=True, peer_gpu=1), [], "no peer access"),
    (dict(cuda_ipc=b"h" * 64, device_uuid=b"u" * 16), PeerFacts(same_process=True, cuda_here=True, peer_gpu=0,
                                                                 same_gpu=True), ["local", "cuda_ipc"], None),
])
def test_candidate_paths(pool, facts, paths, reason):
    got, reasons = candidate_paths(info(**pool), facts)
    assert got == paths
    if reason is None:
        assert reasons == []
    else:
        assert any(reason in r for r in reasons), reasons


def test_allowed_paths_restrict_the_choice_but_never_the_same_process_case():
    got, reasons = candidate_paths(info(**CPU_POOL), PeerFacts(same_process=True), allowed=("host_staged",))
    assert got == ["local", "host_staged"]
    assert reasons == ["shm: excluded by TETRI_KV_TRANSFER"]
    assert set(PATHS) == {"local", "cuda_ipc", "cuda_ipc_p2p", "shm", "host_staged"}


def test_runs_coalesce_consecutive_ids_on_both_sides():
    assert _runs([4, 5, 6, 9], [0, 1, 2, 3]) == [(4, 0, 3), (9, 3, 1)]
    assert _runs([1, 2, 3], [7, 9, 10]) == [(1, 7, 1), (2, 9, 2)]
    assert _runs([3, 2, 1], [0, 1, 2]) == [(3, 0, 1), (2, 1, 1), (1, 2, 1)]
    assert _runs([], []) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=30))
def test_runs_cover_every_pair_once_with_the_fewest_copies(pairs):
    src, dst = [p[0] for p in pairs], [p[1] for p in pairs]
    runs = _runs(src, dst)
    assert [(s + i, d + i) for s, d, n in runs for i in range(n)] == list(zip(src, dst))
    breaks = sum(1 for i in range(1, len(pairs)) if (src[i], dst[i]) != (src[i - 1] + 1, dst[i - 1] + 1))
    assert len(runs) == (breaks + 1 if pairs else 0)


def test_inflight_copies_land_only_when_done_and_settle_waits():
    copies = InflightCopies()
    a, b1, b2, c = FakeCompletion(), FakeCompletion(), FakeCompletion(), FakeCompletion()
    copies.add(InflightCopy("a", 0, ["sa"], [a], 10, "shm"))
    copies.add(InflightCopy("b", 0, ["sb0", "sb1"], [b1, b2], 20, "shm"))
    copies.add(InflightCopy("c", 1, ["sc"], [c], 30, "shm"))
    assert copies.landed() == [] and len(copies) == 3
    b1.finished = True
    assert copies.landed() == []  # one of b's two copies is still running
    b2.finished = a.finished = True
    assert [x.req_id for x in copies.landed()] == ["a", "b"]
    assert "c" in copies and not c.waited
    settled = copies.settle("c")
    assert settled.req_id == "c" and c.waited == 1 and len(copies) == 0
    assert copies.settle("c") is None


def test_settle_from_a_source_waits_for_each_of_its_copies():
    copies = InflightCopies()
    done = [FakeCompletion() for _ in range(3)]
    for i, (req, src) in enumerate([("a", 0), ("b", 1), ("c", 0)]):
        copies.add(InflightCopy(req, src, [], [done[i]], 1, "shm"))
    assert sorted(x.req_id for x in copies.settle_from(0)) == ["a", "c"]
    assert [d.waited for d in done] == [1, 0, 1]
    copies.wait_oldest()
    assert done[1].waited == 1


def test_stamps_name_a_request_and_its_prompt_length():
    s = stamp_of("req-1", 100)
    assert s == stamp_of("req-1", 100) and s > 0
    assert len({s, stamp_of("req-1", 101), stamp_of("req-2", 100), 0}) == 4  # a migrated prompt is longer


def test_allocator_setting_forces_expandable_segments_off_and_keeps_the_rest():
    assert forced_alloc_conf(None) == "expandable_segments:False"
    assert forced_alloc_conf("expandable_segments:True,max_split_size_mb:64") == \
        "max_split_size_mb:64,expandable_segments:False"
    assert forced_alloc_conf(forced_alloc_conf("")) == "expandable_segments:False"


# ---- the supervisor's restart decision ---------------------------------------------------


class _Board:
    def __init__(self, roles) -> None:
        self.roles = roles

    def read(self, wid):
        from types import SimpleNamespace

        return SimpleNamespace(role=self.roles[wid])


class _Procs:
    def __init__(self) -> None:
        self.restarts: dict[int, int] = {}


def _client(max_restarts=5):
    from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
    from tetri.launch import LaunchConfig, WorkerSpec
    from tetri.sched.front import FrontConfig
    from tetri.server.engine_client import RuntimeClient

    client = RuntimeClient(ModelConfig(model="/unused"), CacheConfig(), EngineSchedConfig(), FrontConfig(),
                           LaunchConfig(workers=(WorkerSpec("prefill"), WorkerSpec("decode"))), max_restarts=max_restarts)
    client.procs = _Procs()
    client._dead_role = {1: "decode"}
    return client


def test_the_same_start_failure_twice_stops_restarts_early():
    c = _client()
    c._after_death(1, "killed by signal 9", at_start=False)  # died while serving: restart
    assert 1 in c._restart_at and not c.failed
    c.procs.restarts[1] = 1
    c._after_death(1, "FileNotFoundError: [Errno 2] no such file: '/tmp/m-4821/config.json'", at_start=True)
    assert 1 in c._restart_at and not c.failed
    c.procs.restarts[1] = 2
    c._after_death(1, "FileNotFoundError: [Errno 2] no such file: '/tmp/m-9907/config.json'", at_start=True)
    assert "failed to start 2 times in a row" in c.failed[1] and "FileNotFoundError" in c.failed[1]


def test_different_start_failures_or_a_served_life_keep_restarting():
    c = _client()
    c._after_death(1, "RuntimeError: one thing", at_start=True)
    c._after_death(1, "MemoryError: another", at_start=True)
    assert not c.failed
    c._after_death(1, "killed by signal 9", at_start=False)  # it served in between: the count starts over
    c._after_death(1, "MemoryError: another", at_start=True)
    assert not c.failed


def test_restarts_used_up_are_reported_too():
    c = _client(max_restarts=1)
    c.procs.restarts[1] = 1
    c._after_death(1, "killed by signal 9", at_start=False)
    assert "--max-restarts 1" in c.failed[1] and 1 not in c._restart_at


def test_a_host_staged_pair_makes_the_front_resend_pools_to_the_owner():
    from tetri.protocol import PeerPaths, PeerPools, Ready
    from tetri.server.supervision import worker_fields

    c = _client()
    sent = []
    c._send = lambda wid, msg: sent.append((wid, msg))
    c.board = _Board({0: "prefill", 1: "decode"})
    c.ready = {w: Ready(worker_id=w, pid=1, role="x", device="cpu", pool=info(**CPU_POOL), max_model_len=8,
                        eos_token_ids=[]) for w in (0, 1)}
    c._on_peer_paths(PeerPaths(worker_id=1, paths={0: "shm"}))
    assert sent == []
    c._on_peer_paths(PeerPaths(worker_id=1, paths={0: "host_staged"}, errors={0: "shm: canary mismatch"}))
    assert [(w, type(m)) for w, m in sent] == [(0, PeerPools)]
    c._on_peer_paths(PeerPaths(worker_id=0, paths={1: "host_staged"}))  # a decode peer's pool: not resent
    assert len(sent) == 1  # (a decode worker answers PeerPools with PeerPaths: that would ping-pong)
    assert worker_fields(1, c.failed, c.kv_paths, c.dead) == {
        "kv_transfer": {"0": "host_staged"}, "kv_transfer_errors": {"0": "shm: canary mismatch"}}


class _DeadProcs(_Procs):
    def kill(self, wid) -> None:
        pass

    def last_error(self, wid) -> str:
        return "killed by signal 9"


class _NoMessages:
    def recv(self, flags=0):
        import zmq

        raise zmq.Again()


class _NoLinks:
    """What the dead worker's link does on a death: its queue is discarded."""

    def __init__(self) -> None:
        self.reset_workers: list[int] = []

    def reset(self, wid: int) -> None:
        self.reset_workers.append(wid)


def test_a_worker_death_tells_the_survivors_at_once():
    """The survivors get PeerPools without the dead worker right away (not only at its restart,
    which may never come): decode workers close their mapping of its pool (its memory stays
    resident while mapped) and owners stop staging for it."""
    from tetri.control.load_board import LoadBoard
    from tetri.protocol import PeerPools, Ready

    c = _client()
    c.board = LoadBoard.create(2)
    try:
        for wid, role in ((0, "prefill"), (1, "decode")):
            c.board.write(wid, role=role, state="ready", pid=1)
        c.procs, c._pull_now, c.links = _DeadProcs(), _NoMessages(), _NoLinks()
        c.ready = {w: Ready(worker_id=w, pid=1, role="x", device="cpu", pool=info(), max_model_len=8,
                            eos_token_ids=[]) for w in (0, 1)}
        sent = []
        c._send = lambda wid, msg: sent.append((wid, msg)) if wid not in c.dead else None
        c._on_dead(0, "was killed")
        assert [(w, sorted(m.pools)) for w, m in sent if isinstance(m, PeerPools)] == [(1, [1])]
        assert c.links.reset_workers == [0]
    finally:
        c.board.close()
