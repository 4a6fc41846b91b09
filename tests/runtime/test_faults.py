"""Worker death and shutdown against a real `tetri-serve` subprocess."""

import concurrent.futures as cf
import http.client
import json
import os
import signal
import threading
import time

import openai
import pytest

from tests.reliability.helpers import SERVED, ipc_dir_of, parse_sse, pid_alive, shm_segments_of, wait_until
from tests.runtime.server_proc import ServerProc


def _long_stream(server, model, stop: threading.Event, max_tokens=4000):
    """Stream a long generation until it ends or `stop` is set (then hang up); return
    (tokens received, error text or None)."""
    client = server.openai(timeout=120)
    got = 0
    try:
        stream = client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=max_tokens, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            got += 1 if chunk.choices and chunk.choices[0].text is not None else 0
            if stop.is_set():
                stream.close()
                break
    except (openai.APIError, openai.APIConnectionError) as e:
        return got, str(e)
    return got, None


def test_sigkill_decode_worker_fails_its_requests_and_keeps_serving(default_model_dir):
    """--no-migrate and no restarts: the requests on the killed worker end with a clear error;
    those on the other decode worker go on (they are then hung up on: no need to wait for
    4000 tokens)."""
    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2", "--max-model-len", "4096",
                     "--no-migrate", "--max-restarts", "0").start()
    stop = threading.Event()
    try:
        model = srv.openai().models.list().data[0].id
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(_long_stream, srv, model, stop) for _ in range(4)]
            deadline = time.monotonic() + 60
            decoders = []
            while sum(w["running"] for w in decoders) < 4 and time.monotonic() < deadline:
                time.sleep(0.2)  # until all four decode (so none joins the victim after the kill)
                decoders = [w for w in srv.workers() if w["role"] == "decode"]
            assert sum(w["running"] for w in decoders) == 4, decoders
            victim = max(decoders, key=lambda w: w["running"])
            running_on_victim = victim["running"]
            os.kill(victim["pid"], signal.SIGKILL)
            failed = []
            for f in cf.as_completed(futs, timeout=60):  # never hangs
                if f.result()[1] is not None:
                    failed.append(f.result())
                if len(failed) == running_on_victim:
                    break
            stop.set()
            results = [f.result(timeout=60) for f in futs]
        failed = [r for r in results if r[1] is not None]
        assert len(failed) == running_on_victim, results
        want = f"worker {victim['worker_id']} died while decoding this request"
        assert all(want in err for _, err in failed), (want, failed)
        assert all(got > 0 for got, err in results if err is None), results  # the others kept streaming
        rows = {w["worker_id"]: w for w in srv.workers()}
        assert rows[victim["worker_id"]]["state"] == "dead"
        assert srv.get("/health")[0] == 200  # every role still has a live worker
        # the survivors keep serving, and the prefill side freed the dead worker's handoffs
        out = srv.openai().completions.create(model=model, prompt=[9, 10, 11], max_tokens=5, temperature=0.0,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
        assert srv.wait_idle(), srv.workers()
    finally:
        stop.set()
        srv.stop()


def test_shutdown_on_sigint_leaves_nothing_behind(default_model_dir):
    """What this server's processes hold (found by their pids, so another server on the
    machine does not matter): no process, shared-memory segment or ipc directory survives
    Ctrl-C. (SIGTERM: tests/reliability/test_overload.py checks the same after its drain.)"""
    sig = signal.SIGINT
    srv = ServerProc("--device", "cpu", "--workers", "2").start()
    pids = [w["pid"] for w in srv.workers()]
    segments = shm_segments_of([srv.proc.pid, *pids])
    ipc = ipc_dir_of(srv.proc.pid)
    assert any(s.startswith("tetri-kv-") for s in segments) and any(s.startswith("tetri-board") for s in segments), \
        segments
    assert ipc and os.path.isdir(ipc), ipc
    for pid in pids:  # two workers on their shared cores: idle OpenMP threads sleep (tetri.cli.cpu_threads)
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"OMP_WAIT_POLICY=PASSIVE" in f.read().split(b"\0") or "OMP_WAIT_POLICY" in os.environ
    rc = srv.stop(sig)
    assert rc == 0, srv.log_tail()
    for pid in pids:  # no orphan worker processes
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert [s for s in segments if os.path.exists(f"/dev/shm/{s}")] == []
    assert not os.path.exists(ipc)
    assert "Traceback" not in srv.log_tail(200), srv.log_tail(200)


def test_sigkill_decode_worker_migrates_streams_and_restarts_it(default_model_dir):
    """With migration (the default) the streams on the killed worker resume elsewhere: every
    client gets its full output, token-identical to the offline engine; the worker restarts."""
    from tetri import LLM, SamplingParams

    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2").start()
    try:
        model = srv.openai().models.list().data[0].id
        prompts = [[5 + i, 6, 7, 8 + i] for i in range(4)]
        client = srv.openai(timeout=120)

        def stream(p):
            ids = []
            for chunk in client.completions.create(model=model, prompt=p, max_tokens=300, temperature=0.0, stream=True,
                                                   extra_body={"ignore_eos": True, "return_token_ids": True}):
                for ch in chunk.choices:
                    ids.extend((ch.model_extra or {}).get("token_ids") or [])
            return ids

        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(stream, p) for p in prompts]
            victim = None
            deadline = time.monotonic() + 60
            while victim is None and time.monotonic() < deadline:
                busy = [w for w in srv.workers() if w["role"] == "decode" and w["running"] > 0]
                victim = busy[0] if busy else None
                time.sleep(0.05)
            assert victim is not None
            os.kill(victim["pid"], signal.SIGKILL)
            got = [f.result(timeout=120) for f in futs]
        want = LLM(default_model_dir).generate(prompts, SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True))
        assert got == [w.token_ids for w in want]  # nothing duplicated, nothing missing
        status, metrics = srv.get("/metrics")
        migrated = [line for line in metrics.splitlines() if line.startswith("tetri:requests_migrated_total")]
        assert migrated and float(migrated[0].split()[-1]) >= 1
        deadline = time.monotonic() + 60
        row = None
        while time.monotonic() < deadline:
            row = next(w for w in srv.workers() if w["worker_id"] == victim["worker_id"])
            if row["state"] == "ready" and row["restarts"] == 1:
                break
            time.sleep(0.3)
        assert row["state"] == "ready" and row["restarts"] == 1, row
        assert srv.wait_idle()
    finally:
        srv.stop()


def _stream_raw(port: int, prompt: list[int], max_tokens: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "ignore_eos": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_stopped_worker_is_detected_its_requests_park_and_time_out(default_model_dir):
    """A worker that stops beating without exiting (SIGSTOP, by pid) is declared dead after
    --heartbeat-timeout-s and killed; its requests migrate, find no live prefill worker (no
    restarts) and wait parked, /health says 503, and --request-timeout-s ends them with an
    error instead of letting them wait for ever."""
    request_timeout_s = 6
    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "1", "--max-restarts", "0",
                     "--heartbeat-timeout-s", "2", "--request-timeout-s", str(request_timeout_s)).start()
    try:
        prefill = next(w for w in srv.workers() if w["role"] == "prefill")
        os.kill(prefill["pid"], signal.SIGSTOP)  # alive, but its row stops beating
        t_stop = time.monotonic()
        with cf.ThreadPoolExecutor(2) as pool:
            # sent at once, well inside the heartbeat timeout: both go to the stopped worker
            futs = [pool.submit(_stream_raw, srv.port, [5 + i, 6, 7, 8], 4) for i in range(2)]
            assert wait_until(lambda: next(w for w in srv.workers() if w["worker_id"] == prefill["worker_id"])
                              ["state"] == "dead", 60), srv.workers()
            detected_s = time.monotonic() - t_stop
            assert detected_s >= 2, detected_s  # not before the heartbeat timeout
            assert wait_until(lambda: not pid_alive(prefill["pid"]), 10)  # SIGKILLed, stopped or not
            assert srv.get("/health")[0] == 503  # the prefill role has no live worker (no restarts)
            assert srv.get("/workers")[1]["num_running"] == 2  # parked, not failed
            results = [f.result(timeout=120) for f in futs]
        for status, raw in results:
            assert status == 200, raw[:300]
            errors = [e for e in parse_sse(raw) if isinstance(e, dict) and "error" in e]
            assert errors and f"exceeded its {request_timeout_s} s deadline" in errors[0]["error"]["message"], raw
        assert time.monotonic() - t_stop >= request_timeout_s
        assert srv.get("/workers")[1]["num_running"] == 0
        assert f"worker {prefill['worker_id']} stopped heartbeating" in srv.log_tail(200)
    finally:
        srv.stop()


def test_restart_back_off_doubles_from_1_s_up_to_30_s():
    """The supervisor waits restart_delay_s(restarts so far) before respawning a dead worker."""
    from tetri.launch import restart_delay_s

    assert [restart_delay_s(k) for k in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert restart_delay_s(10**6) == 30.0  # no overflow however often it died
