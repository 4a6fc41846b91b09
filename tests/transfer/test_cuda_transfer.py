"""The CUDA paths of the KV transfer: skipped without a GPU (the conftest skips `gpu` tests when
CUDA is absent); tools/gpu_check.sh runs them on the GPU machine. NONE OF THESE HAS RUN: no GPU
was available to the project."""

import pytest
import torch

from tests.transfer.owner import LAYOUT_ARGS, Owner
from tetri.workers import cuda_ipc
from tetri.workers.kv_pool import KVPool, PoolLayout
from tetri.workers.kv_stage import stamp_of
from tetri.workers.kv_transfer import EventDone, LocalEnd, StreamCopier, open_peer
from tetri.workers.node import pool_info

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_owner():
    o = Owner("cuda:0")
    yield o
    o.close()


def _filled(owner, values: dict[int, float]):
    for b, v in values.items():
        owner.ask("fill", [b], v)


def test_two_processes_on_one_gpu_copy_through_cuda_ipc(gpu_owner):
    _filled(gpu_owner, {3: 1.5, 4: 2.5, 9: 4.5})
    info = gpu_owner.info()
    assert info.cuda_ipc is not None and len(info.cuda_ipc) == 64 and info.export_error is None
    assert len(info.device_uuid) == 16 and info.shm_name is None and info.stage_shm
    opened_before = cuda_ipc.num_open()
    src = open_peer(info, LocalEnd(1, "cuda:0"))
    assert src.path == "cuda_ipc" and src.error is None and cuda_ipc.num_open() == opened_before + 1
    dst = KVPool.allocate(PoolLayout(*LAYOUT_ARGS), "cuda:0")
    done = src.copy_into(dst, [3, 4, 9], [0, 1, 5])
    assert isinstance(done, EventDone)
    done.wait()
    assert done.done()
    assert [dst.data[b].unique().tolist() for b in (0, 1, 5, 2)] == [[1.5], [2.5], [4.5], [0.0]]
    again = open_peer(info, LocalEnd(1, "cuda:0"))  # a second open in this context is the cached mapping
    assert again.src.data_ptr() == src.src.data_ptr() and cuda_ipc.num_open() == opened_before + 1
    again.close()
    src.close()
    assert cuda_ipc.num_open() == opened_before


def test_the_owning_process_uses_its_tensor_and_opens_no_handle():
    pool = KVPool.allocate(PoolLayout(*LAYOUT_ARGS), "cuda:0", shared=True)
    try:
        before = cuda_ipc.num_open()
        src = open_peer(pool_info(pool), LocalEnd(0, "cuda:0"))
        assert src.path == "local" and src.src.data_ptr() == pool.data.data_ptr() and cuda_ipc.num_open() == before
    finally:
        pool.close()


def test_a_canary_mismatch_through_ipc_falls_back_to_host_staged():
    owner = Owner("cuda:0")
    try:
        _filled(owner, {2: 7.0, 3: 8.0})
        owner.ask("corrupt")
        info = owner.info()
        src = open_peer(info, LocalEnd(1, "cuda:0"))
        assert src.path == "host_staged" and "canary mismatch" in src.error
        stamp = stamp_of("r", 40)
        assert not src.ready([2, 3], stamp)
        owner.ask("stage", [2, 3], stamp)  # device -> pinned mirror, in the owner
        assert src.ready([2, 3], stamp)
        dst = KVPool.allocate(PoolLayout(*LAYOUT_ARGS), "cuda:0")
        src.copy_into(dst, [2, 3], [10, 11]).wait()
        assert dst.data[10].unique().tolist() == [7.0] and dst.data[11].unique().tolist() == [8.0]
        src.close()
    finally:
        owner.close()


def test_expandable_segments_are_not_exported_and_peers_take_the_host_staged_path():
    owner = Owner("cuda:0", alloc_conf="expandable_segments:True")
    try:
        info = owner.info()
        assert info.cuda_ipc is None and "expandable segments" in info.export_error
        src = open_peer(info, LocalEnd(1, "cuda:0"))
        assert src.path == "host_staged" and "exported no handle" in src.error
        src.close()
    finally:
        owner.close()


def test_the_copy_stream_waits_for_work_already_queued_on_the_destination():
    src = torch.full((4, 1 << 20), 3.0, device="cuda:0")
    dst = torch.zeros_like(src)
    torch.cuda._sleep(200_000_000)  # keep the current stream busy, then write the destination
    dst.fill_(1.0)
    done = StreamCopier("cuda:0").copy(dst, src, [0, 1, 2, 3], [0, 1, 2, 3])
    done.wait()
    assert dst.unique().tolist() == [3.0]  # the copy ran after the fill, not before it


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the GPU machine has one)")
def test_peer_gpus_copy_through_p2p_or_fall_back():
    owner = Owner("cuda:1")
    try:
        _filled(owner, {1: 5.0})
        src = open_peer(owner.info(), LocalEnd(1, "cuda:0"))
        expected = "cuda_ipc_p2p" if torch.cuda.can_device_access_peer(0, 1) else "host_staged"
        assert src.path == expected
        if expected == "host_staged":
            owner.ask("stage", [1], stamp_of("r", 16))
        dst = KVPool.allocate(PoolLayout(*LAYOUT_ARGS), "cuda:0")
        src.copy_into(dst, [1], [0]).wait()
        assert dst.data[0].unique().tolist() == [5.0]
        src.close()
    finally:
        owner.close()
