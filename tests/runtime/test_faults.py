"""Worker death and shutdown against a real `tetri-serve` subprocess."""

import concurrent.futures as cf
import http.client
import json
import os
import signal
import threading
import time

import jsonschema
import openai
import pytest

from tests.reliability.helpers import SERVED, ipc_dir_of, parse_sse, pid_alive, shm_segments_of, wait_until
from tests.runtime.server_proc import ServerProc


def _decoding(decoding: threading.Semaphore, n: int) -> None:
    """Wait until `n` streams got their second token: each is then decoding on a decode
    worker (the first token comes from the prefill worker)."""
    for _ in range(n):
        assert decoding.acquire(timeout=120), "a stream never reached its second token"


def _busy_decoder(srv) -> dict | None:
    """A decode worker's row once it shows a running request (rows are written just after
    the step's tokens went out, so poll briefly)."""
    return wait_until(lambda: next((w for w in srv.workers() if w["role"] == "decode" and w["running"]), None),
                      30, every_s=0.02)


HELD_ITEMS = {"type": "array", "items": {"enum": ["alpha", "beta", "gamma", "delta"]}, "minItems": 40, "maxItems": 40}
HELD = {"json": HELD_ITEMS, "disable_any_whitespace": True}
HELD_PROMPT = [9, 10, 11]


def _kill_under_a_constrained_stream(srv, client, model) -> tuple[list[int], str, str | None, int]:
    """Stream HELD_PROMPT under the HELD schema alone and SIGKILL the decode worker holding it once
    it is decoding; (token ids, text, finish_reason, tokens streamed before the kill)."""
    ids: list[int] = []
    texts: list[str] = []
    decoding = threading.Semaphore(0)

    def stream() -> str | None:
        finish, released = None, False
        for chunk in client.completions.create(model=model, prompt=HELD_PROMPT, max_tokens=1500, temperature=0.0,
                                               stream=True, extra_body={"structured_outputs": HELD,
                                                                        "return_token_ids": True}):
            for ch in chunk.choices:
                ids.extend((ch.model_extra or {}).get("token_ids") or [])
                texts.append(ch.text or "")
                finish = ch.finish_reason or finish
            if len(ids) >= 2 and not released:
                released = True
                decoding.release()
        return finish

    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(stream)
        _decoding(decoding, 1)
        victim = _busy_decoder(srv)  # the only request: the busy decode worker holds it
        assert victim is not None, srv.workers()
        emitted_at_kill = len(ids)
        os.kill(victim["pid"], signal.SIGKILL)
        finish = fut.result(timeout=300)
    return ids, "".join(texts), finish, emitted_at_kill


def _long_stream(server, model, decoding: threading.Semaphore, max_tokens=4000):
    """Stream a long generation; return (tokens received, error text or None). `decoding`
    is released at the second token."""
    client = server.openai(timeout=120)
    got, released = 0, False
    try:
        stream = client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=max_tokens, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        for chunk in stream:
            got += len((chunk.choices[0].model_extra or {}).get("token_ids") or []) if chunk.choices else 0
            if got >= 2 and not released:
                released = True
                decoding.release()
    except (openai.APIError, openai.APIConnectionError) as e:
        return got, str(e)
    return got, None


def test_sigkill_decode_worker_fails_its_requests_and_keeps_serving(default_model_dir):
    """--no-migrate and no restarts: the requests on the killed worker end with a clear error;
    the others finish whole on the other decode worker."""
    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2", "--max-model-len", "4096",
                     "--no-migrate", "--max-restarts", "0").start()
    decoding = threading.Semaphore(0)
    try:
        model = srv.openai().models.list().data[0].id
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(_long_stream, srv, model, decoding) for _ in range(4)]
            _decoding(decoding, 1)
            victim = _busy_decoder(srv)
            assert victim is not None, srv.workers()
            os.kill(victim["pid"], signal.SIGKILL)
            results = [f.result(timeout=120) for f in futs]  # never hangs
        failed = [r for r in results if r[1] is not None]
        assert failed, results
        want = f"worker {victim['worker_id']} died while decoding this request"
        assert all(want in err for _, err in failed), (want, failed)
        assert all(got == 4000 for got, err in results if err is None), results  # the others finished whole
        rows = {w["worker_id"]: w for w in srv.workers()}
        assert rows[victim["worker_id"]]["state"] == "dead"
        assert srv.get("/health")[0] == 200  # every role still has a live worker
        # the survivors keep serving, and the prefill side freed the dead worker's handoffs
        out = srv.openai().completions.create(model=model, prompt=[9, 10, 11], max_tokens=5, temperature=0.0,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
        assert srv.wait_idle(), srv.workers()
    finally:
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
    client gets its full output, token-identical to the offline engine; the worker restarts.
    Then a stream held to a JSON schema loses its decode worker the same way: its grammar
    resumes after the tokens already streamed, and its output still validates (issue 17)."""
    from tetri import LLM, SamplingParams
    from tetri.types import StructuredOutputsParams

    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2").start()
    try:
        model = srv.openai().models.list().data[0].id
        prompts = [[5 + i, 6, 7, 8 + i] for i in range(4)]
        client = srv.openai(timeout=120)

        decoding = threading.Semaphore(0)

        def stream(p):
            ids, released = [], False
            for chunk in client.completions.create(model=model, prompt=p, max_tokens=1000, temperature=0.0,
                                                   stream=True,
                                                   extra_body={"ignore_eos": True, "return_token_ids": True}):
                for ch in chunk.choices:
                    ids.extend((ch.model_extra or {}).get("token_ids") or [])
                if len(ids) >= 2 and not released:
                    released = True
                    decoding.release()
            return ids

        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(stream, p) for p in prompts]
            _decoding(decoding, 1)
            victim = _busy_decoder(srv)
            assert victim is not None, srv.workers()
            os.kill(victim["pid"], signal.SIGKILL)
            got = [f.result(timeout=120) for f in futs]
        llm = LLM(default_model_dir)
        want = llm.generate(prompts, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))
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
        held_ids, held_text, finish, emitted_at_kill = _kill_under_a_constrained_stream(srv, client, model)
        spec = StructuredOutputsParams(json=json.dumps(HELD_ITEMS), any_whitespace=False)
        held_want = llm.generate([HELD_PROMPT], SamplingParams(max_tokens=1500, temperature=0.0,
                                                               structured_outputs=spec))[0]
        assert 0 < emitted_at_kill < len(held_ids)  # the kill came mid-stream
        assert finish == "stop" and held_ids == held_want.token_ids  # nothing duplicated, nothing missing
        jsonschema.validate(json.loads(held_text), HELD_ITEMS)
        migrated = [line for line in srv.get("/metrics")[1].splitlines()
                    if line.startswith("tetri:requests_migrated_total")]
        assert float(migrated[0].split()[-1]) >= 2
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
