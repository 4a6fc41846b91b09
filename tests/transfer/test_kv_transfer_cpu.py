"""The KV transfer interface on CPU: real pools owned by another process in real shared memory,
opened by a real decode node (the CPU implementation of the interface the CUDA paths share)."""

import logging
from multiprocessing import shared_memory

import pytest
import torch

from tests.transfer.owner import LAYOUT_ARGS, Owner
from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.protocol import Handoff, PeerPaths, PeerPools, WorkerError
from tetri.types import SamplingParams
from tetri.workers import kv_transfer
from tetri.workers.executor import Executor
from tetri.workers.kv_pool import CANARY_BYTES, KVPool, PoolLayout
from tetri.workers.kv_stage import stamp_of, with_stage
from tetri.workers.kv_transfer import LocalEnd, open_peer
from tetri.workers.node import WorkerNode, pool_info


@pytest.fixture(scope="module")
def owners():
    """Two pool owners, started together (each spawn imports torch: seconds on a loaded box)."""
    pair = (Owner(), Owner())
    yield pair
    for o in pair:
        o.close()


@pytest.fixture
def owner(owners):
    return owners[0]


@pytest.fixture
def other(owners):
    return owners[1]


@pytest.fixture
def decode_node(default_model_dir):
    ex = Executor(ModelConfig(model=default_model_dir), CacheConfig(num_blocks=64))
    node = WorkerNode(1, "decode", ex, EngineSchedConfig(chunk_size=16))
    yield node
    for src in list(node.core.peers.values()):
        src.close()
    ex.close()


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return f"/dev/shm/{name}" in f.read()


@pytest.fixture
def count_opens(monkeypatch):
    opens = []
    for path in ("shm", "host_staged"):
        real = kv_transfer._OPENERS[path]
        monkeypatch.setitem(kv_transfer._OPENERS, path, lambda i, e, real=real, path=path: (opens.append(path), real(i, e))[1])
    return opens


def test_each_peer_pool_is_opened_once_and_a_new_pool_replaces_the_old_mapping(owner, other, decode_node, count_opens):
    first = owner.info()
    own = pool_info(decode_node.ex.pool)
    for _ in range(3):  # PeerPools comes again whenever any worker restarts
        (paths,) = decode_node.handle(PeerPools(pools={0: first, 1: own}), 0.0)
        assert isinstance(paths, PeerPaths) and paths.paths == {0: "shm"} and paths.errors == {}
    assert count_opens == ["shm"]
    old = decode_node.core.peers[0]
    assert _mapped(first.shm_name)
    second = other.info()  # the peer came back with a new pool
    decode_node.handle(PeerPools(pools={0: second, 1: own}), 0.0)
    assert count_opens == ["shm", "shm"]
    assert old.src is None and not _mapped(first.shm_name)  # the old mapping is closed
    assert _mapped(second.shm_name) and decode_node.core.peers[0] is not old
    decode_node.handle(PeerPools(pools={1: own}), 0.0)  # the peer died and did not come back
    assert decode_node.core.peers == {} and not _mapped(second.shm_name)


def test_copies_through_shared_memory_land_block_for_block(owner):
    owner.ask("fill", [3, 4, 5, 9], 0.0)
    for b, v in ((3, 1.5), (4, 2.5), (5, 3.5), (9, 4.5)):
        owner.ask("fill", [b], v)
    src = open_peer(owner.info(), LocalEnd(1))
    dst = KVPool.allocate(PoolLayout(*LAYOUT_ARGS))
    try:
        assert src.path == "shm" and src.ready([3], 123)  # no staging on this path
        assert src.copy_into(dst, [3, 4, 5, 9], [0, 1, 2, 7]).done()
        assert [dst.data[b].unique().tolist() for b in (0, 1, 2, 7, 3)] == [[1.5], [2.5], [3.5], [4.5], [0.0]]
    finally:
        src.close()


def test_a_canary_mismatch_is_refused_and_the_host_staged_path_takes_over(other, caplog):
    bad = other
    info = bad.info()
    seg = shared_memory.SharedMemory(name=info.shm_name)
    tail = bytes(seg.buf[seg.size - CANARY_BYTES:seg.size])
    seg.buf[seg.size - CANARY_BYTES:seg.size] = bytes(CANARY_BYTES)  # someone else's memory, say
    try:
        bad.ask("fill", [2, 3], 7.0)
        with caplog.at_level(logging.WARNING, logger="tetri.kv"):
            src = open_peer(info, LocalEnd(1))
        assert src.path == "host_staged"
        assert "canary mismatch" in src.error and info.shm_name in src.error
        assert any("canary mismatch" in r.getMessage() for r in caplog.records)
        dst = KVPool.allocate(PoolLayout(*LAYOUT_ARGS))
        stamp = stamp_of("r", 20)
        assert not src.ready([2, 3], stamp)  # the owner has not staged them: the peer must not read them
        bad.ask("stage", [2, 3], stamp)
        assert src.ready([2, 3], stamp) and not src.ready([2, 3], stamp_of("r", 21))
        assert src.copy_into(dst, [2, 3], [5, 6]).done()
        assert dst.data[5:7].unique().tolist() == [7.0]
        src.close()
    finally:
        seg.buf[seg.size - CANARY_BYTES:seg.size] = tail
        seg.close()


def _cuda_like(info, **kw):
    import msgspec

    return msgspec.structs.replace(info, shm_name=None, cuda_ipc=b"\x01" * 64, device_uuid=b"\x02" * 16,
                                   device_index=0, **kw)


def test_pools_that_do_not_open_fall_back_or_fail_their_handoffs_at_once(owner, decode_node, caplog):
    import msgspec

    info = owner.info()
    own = pool_info(decode_node.ex.pool)
    with caplog.at_level(logging.WARNING, logger="tetri.kv"):
        gone = open_peer(msgspec.structs.replace(info, shm_name="tetri-kv-no-such-segment"), LocalEnd(1))
    assert gone.path == "host_staged" and "no-such-segment" in gone.error
    assert any("host_staged" in r.getMessage() for r in caplog.records)
    gone.close()
    # a GPU pool (no shared-memory name) seen from a CPU worker: the crash loop of old, now a fallback
    (paths,) = decode_node.handle(PeerPools(pools={0: _cuda_like(info), 1: own}), 0.0)
    assert paths.paths == {0: "host_staged"} and "this worker has no GPU" in paths.errors[0]
    (paths,) = decode_node.handle(PeerPools(pools={0: _cuda_like(info, stage_shm=None), 1: own}), 0.0)
    assert paths.paths == {0: "none"}
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    decode_node.handle(Handoff(req_id="r", src_worker=0, block_ids=[0], prompt_token_ids=[5, 6, 7], params=params,
                               first_tokens=[9], open_choices=[0]), 0.0)
    (err,) = decode_node.step(0.0)
    assert isinstance(err, WorkerError) and err.req_id == "r" and "no KV transfer path from worker 0" in err.message
    assert decode_node.ex.blocks.num_used == 0 and not decode_node.has_work()


def test_the_same_process_uses_its_pool_directly():
    pool = with_stage(KVPool.allocate(PoolLayout(*LAYOUT_ARGS), shared=True))
    try:
        src = open_peer(pool_info(pool), LocalEnd(0))
        assert src.path == "local" and src.src.data_ptr() == pool.data.data_ptr()
    finally:
        pool.close()


def test_the_owner_stages_only_for_peers_that_asked_and_stamps_what_it_staged():
    pool = with_stage(KVPool.allocate(PoolLayout(*LAYOUT_ARGS), shared=True))
    try:
        stage = pool.stage
        assert stage.wanted_by() == frozenset()
        peer = open_peer(msgspec_replace(pool_info(pool), owner_pid=-1), LocalEnd(5), allowed=("host_staged",))
        assert peer.path == "host_staged" and stage.wanted_by() == {5}
        pool.data[4].fill_(3.0)
        stage.put(pool.data, [4], 77)
        assert peer.ready([4], 77) and torch.equal(peer.src[4], pool.data[4])
        peer.close()
        assert stage.wanted_by() == frozenset()
    finally:
        pool.close()


def test_the_owner_does_not_restage_a_block_the_mirror_holds_under_the_same_stamp():
    """A stamp names a block's content (its prefix hash with caching on): a cached prefix staged
    for one request is not copied into the mirror again for the next; a new stamp is."""
    pool = with_stage(KVPool.allocate(PoolLayout(*LAYOUT_ARGS), shared=True))
    try:
        stage = pool.stage
        pool.data[2].fill_(1.0)
        pool.data[3].fill_(2.0)
        assert stage.put(pool.data, [2, 3], [11, 12])
        pool.data[2].fill_(9.0)  # were it copied again, the mirror would show it
        pool.data[3].fill_(8.0)
        assert stage.put(pool.data, [2, 3], [11, 13])
        mirror = stage.mirror
        assert torch.all(mirror.data[2] == 1.0) and torch.equal(mirror.data[3], pool.data[3])
        assert list(mirror.stamps[[2, 3]]) == [11, 13]
    finally:
        pool.close()


def msgspec_replace(info, **kw):
    import msgspec

    return msgspec.structs.replace(info, **kw)


def test_a_failing_gpu_probe_or_opener_falls_back_instead_of_raising(monkeypatch, caplog):
    """Any exception while probing or opening a path is a reason to try the next one: an
    exception escaping PeerPools handling would kill the worker at every restart (a crash loop)."""
    pool = with_stage(KVPool.allocate(PoolLayout(*LAYOUT_ARGS), shared=True))
    info = msgspec_replace(pool_info(pool), owner_pid=-1)
    try:
        def broken_probe(info, end):
            raise RuntimeError("CUDA driver error: initialization error")

        monkeypatch.setattr(kv_transfer, "probe_facts", broken_probe)
        src = open_peer(info, LocalEnd(1))
        assert src.path == "shm" and "GPU probe failed: CUDA driver error" in src.error
        src.close()

        def broken_shm(info, end):
            raise TypeError("an unexpected failure inside the opener")

        monkeypatch.setitem(kv_transfer._OPENERS, "shm", broken_shm)
        with caplog.at_level(logging.WARNING, logger="tetri.kv"):
            src = open_peer(info, LocalEnd(1))
        assert src.path == "host_staged" and "shm: an unexpected failure" in src.error
        assert any("KV path shm to the pool" in r.getMessage() for r in caplog.records)
        src.close()
    finally:
        pool.close()


def test_a_receiver_killed_mid_copy_leaves_the_owner_free_to_reuse_and_unlink(default_model_dir):
    """A real peer process copying out of the owner's staging mirror is SIGKILLed mid-copy: its
    flag stays set in the shared mirror, but the owner stops staging for it once the front's
    PeerPools no longer lists it, re-stages the same blocks for another request, and unlinks
    both segments at close (nothing left in /dev/shm)."""
    import os
    import signal

    from tests.transfer.owner import start_receiver
    from tetri.protocol import encode
    from tetri.workers.kv_stage import stage_finished

    ex = Executor(ModelConfig(model=default_model_dir), CacheConfig(num_blocks=32), shared_pool=True)
    node = WorkerNode(0, "prefill", ex, EngineSchedConfig(chunk_size=16))
    info = pool_info(ex.pool)
    names = {info.shm_name, info.stage_shm}
    stage = ex.pool.stage
    proc, conn = start_receiver(encode(info), 3)
    try:
        node.handle(PeerPools(pools={0: info, 3: info}), 0.0)
        assert conn.poll(120) and conn.recv() == "host_staged"
        assert stage.wanted_by() == {3}
        held = ex.blocks.ensure_capacity("r/0", 64)  # the owner holds a prompt's blocks
        ex.pool.data[held].fill_(2.0)
        assert stage.put(ex.pool.data, held, stamp_of("r", 64))
        assert conn.poll(120) and conn.recv() == "copying"
        os.kill(proc.pid, signal.SIGKILL)  # while it loops copying out of the mirror
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        assert stage.wanted_by() == {3}  # its flag is still set: it never cleared it
        node.handle(PeerPools(pools={0: info}), 0.0)  # the front: worker 3 is dead
        assert stage.wanted_by() == frozenset()
        puts = []
        stage.put = lambda *a: puts.append(a) or True  # (an instance attribute: the class's stays)
        finished = type("Done", (), {"finished": [type("R", (), {"block_ids": held, "req_id": "s",
                                                                 "num_prompt_tokens": 64})()]})()
        stage_finished(ex, node.core, finished)
        assert puts == []  # nothing staged for a dead peer
        ex.blocks.free("r/0")  # the owner frees and reuses its blocks as if the peer never was
        again = ex.blocks.ensure_capacity("s/0", 64)
        assert sorted(again) == sorted(held)
        node.handle(PeerPools(pools={0: info, 3: info}), 0.0)  # a restarted worker 3: its flag counts again
        assert stage.wanted_by() == {3}
    finally:
        if proc.is_alive():
            proc.kill()
        ex.close()
    assert not names & set(os.listdir("/dev/shm"))
