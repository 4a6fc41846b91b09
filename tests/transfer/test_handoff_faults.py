"""KV handoff faults against a real `tetri-serve` (CPU workers, real shared memory, the official
openai SDK): a peer killed while the decode worker maps its pool, a pool whose canary is wrong
(the host-staged fallback serving), and a worker that fails the same way at every restart."""

import os
import shutil
import signal
import time
from multiprocessing import shared_memory

from tests.runtime.server_proc import ServerProc
from tetri.workers.kv_pool import CANARY_BYTES

PROMPTS = [[5, 6, 7, 8], list(range(20, 70))]


def pool_segments(pid: int, prefix: str = "tetri-kv-") -> set[str]:
    """The shared-memory segments a process maps (its own pool, the peer pools it opened)."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split("/dev/shm/")[1].split()[0] for line in f if f"/dev/shm/{prefix}" in line}


def wait_for(cond, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def row(srv, role):
    return next(w for w in srv.workers() if w["role"] == role)


def greedy(srv):
    client = srv.openai(timeout=60)
    model = client.models.list().data[0].id
    return [client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0.0).choices[0].text
            for p in PROMPTS]


def restarted(srv, role, old_pid):
    def check():
        if srv.get("/health")[0] != 200:
            return None
        w = row(srv, role)
        return w if w["pid"] != old_pid and w["state"] == "ready" and "kv_transfer" in row(srv, "decode") else None
    return wait_for(check, f"the {role} worker's restart")


def test_peer_death_reopen_host_staged_fallback_and_giving_up_early(default_model_dir, tmp_path):
    """One server through four faults (a server start is the dear part on 2 cores)."""
    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "1", "--chunk-size", "32",
                     "--model", str(model)).start()
    try:
        expected = greedy(srv)
        prefill, decode = row(srv, "prefill"), row(srv, "decode")
        assert decode["kv_transfer"] == {"0": "shm"} and decode["kv_transfer_errors"] == {}
        (old_pool,) = pool_segments(prefill["pid"])
        assert old_pool in pool_segments(decode["pid"])  # the decode worker maps the prefill pool

        # 1. the prefill worker dies while the decode worker has its pool open
        os.kill(prefill["pid"], signal.SIGKILL)
        prefill = restarted(srv, "prefill", prefill["pid"])
        (new_pool,) = pool_segments(prefill["pid"])
        wait_for(lambda: new_pool in pool_segments(decode["pid"]), "the decode worker to open the new pool")
        assert old_pool not in pool_segments(decode["pid"]) and row(srv, "decode")["pid"] == decode["pid"]
        assert greedy(srv) == expected  # it kept serving, with blocks freed and reused
        assert srv.wait_idle()

        # 2. the pool fails its canary check when a fresh decode worker opens it
        seg = shared_memory.SharedMemory(name=new_pool)
        seg.buf[seg.size - CANARY_BYTES:seg.size] = bytes(CANARY_BYTES)
        seg.close()
        os.kill(decode["pid"], signal.SIGKILL)
        decode = restarted(srv, "decode", decode["pid"])
        assert decode["kv_transfer"] == {"0": "host_staged"}
        assert "canary mismatch" in decode["kv_transfer_errors"]["0"]
        assert greedy(srv) == expected  # served through the staging mirror
        assert srv.wait_idle()
        metrics = srv.get("/metrics")[1]
        assert 'tetri:kv_transfer_path_info{dst_worker="1",path="host_staged",src_worker="0"} 1.0' in metrics
        staged = [line for line in metrics.splitlines()
                  if line.startswith('tetri:kv_transfer_path_bytes_total{path="host_staged"}')]
        assert staged and float(staged[0].split()[-1]) > 0
        assert "canary mismatch" in srv.log_tail(400)  # the warning

        # 3. every restart now fails the same way (the model is gone): given up early, and said why
        shutil.rmtree(model)
        os.kill(decode["pid"], signal.SIGKILL)
        wait_for(lambda: "error" in row(srv, "decode"), "the decode worker to be given up")
        failed = row(srv, "decode")
        assert failed["state"] == "dead"
        # 1 earlier, then two failed starts: well before --max-restarts 5
        assert failed["restarts"] == 3, (failed, srv.log_tail(40))
        assert "failed to start 2 times in a row" in failed["error"] and str(model) in failed["error"]
        status, body = srv.get("/health")
        assert status == 503 and "no live decode worker" in body["error"]["message"]
        assert "failed to start 2 times" in body["error"]["message"]
    finally:
        srv.stop()
