"""Worker death and shutdown against a real `tetri-serve` subprocess."""

import concurrent.futures as cf
import json
import os
import signal
import time

import jsonschema
import openai
import pytest

from tests.runtime.server_proc import ServerProc

HELD_ITEMS = {"type": "array", "items": {"enum": ["alpha", "beta", "gamma", "delta"]}, "minItems": 40, "maxItems": 40}
HELD = {"json": HELD_ITEMS, "disable_any_whitespace": True}
HELD_PROMPT = [9, 10, 11]


def _decoders(server) -> list[dict]:
    return [w for w in server.workers() if w["role"] == "decode"]


def _stream_into(client, model, prompt, ids: list[int], texts: list[str], max_tokens: int, **extra) -> str | None:
    """Stream a greedy completion, appending its token ids and text pieces as they come; its finish_reason."""
    finish = None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                           stream=True, extra_body={"return_token_ids": True, **extra}):
        for ch in chunk.choices:
            ids.extend((ch.model_extra or {}).get("token_ids") or [])
            texts.append(ch.text or "")
            finish = ch.finish_reason or finish
    return finish


def _wait_for(probe, timeout_s: float):
    """Poll `probe` until it returns something other than None (or the deadline passes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.02)
    return None


def _long_stream(server, model, max_tokens=4000):
    """Stream a long generation; return (tokens received, error text or None)."""
    client = server.openai(timeout=120)
    got = 0
    try:
        stream = client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=max_tokens, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            got += 1 if chunk.choices and chunk.choices[0].text is not None else 0
    except (openai.APIError, openai.APIConnectionError) as e:
        return got, str(e)
    return got, None


def test_sigkill_decode_worker_fails_its_requests_and_keeps_serving(default_model_dir):
    """--no-migrate and no restarts: the requests on the killed worker end with a clear error."""
    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2", "--max-model-len", "4096",
                     "--no-migrate", "--max-restarts", "0").start()
    try:
        model = srv.openai().models.list().data[0].id
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(_long_stream, srv, model) for _ in range(4)]
            deadline = time.monotonic() + 60
            victim = None
            while victim is None and time.monotonic() < deadline:
                busy = [w for w in srv.workers() if w["role"] == "decode" and w["running"] > 0]
                victim = busy[0] if busy else None
                time.sleep(0.2)
            assert victim is not None, "no decode worker picked the requests up"
            os.kill(victim["pid"], signal.SIGKILL)
            results = [f.result(timeout=60) for f in futs]  # never hangs
        failed = [r for r in results if r[1] is not None]
        assert failed, results
        assert all("died" in err or "error" in err.lower() for _, err in failed)
        rows = {w["worker_id"]: w for w in srv.workers()}
        assert rows[victim["worker_id"]]["state"] == "dead"
        assert srv.get("/health")[0] == 200  # every role still has a live worker
        # the survivors keep serving, and the prefill side freed the dead worker's handoffs
        out = srv.openai().completions.create(model=model, prompt=[9, 10, 11], max_tokens=5, temperature=0.0)
        assert out.choices[0].finish_reason in ("length", "stop")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            live = [w for w in srv.workers() if w["state"] != "dead"]
            if all(w["kv_blocks_used"] == 0 for w in live):
                break
            time.sleep(0.2)
        assert all(w["kv_blocks_used"] == 0 for w in srv.workers() if w["state"] != "dead"), srv.workers()
    finally:
        srv.stop()


def _leftovers(before_shm: set[str]) -> list[str]:
    return sorted(set(os.listdir("/dev/shm")) - before_shm)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_nothing_behind(default_model_dir, sig):
    before = set(os.listdir("/dev/shm"))
    srv = ServerProc("--device", "cpu", "--workers", "2").start()
    pids = [w["pid"] for w in srv.workers()]
    assert any(n.startswith("tetri-") for n in _leftovers(before))
    ipc_dirs_before = {d for d in os.listdir("/tmp") if d.startswith("tetri-ipc-")}
    rc = srv.stop(sig)
    assert rc == 0, srv.log_tail()
    for pid in pids:  # no orphan worker processes
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert [n for n in _leftovers(before) if n.startswith("tetri-")] == []
    assert "Traceback" not in srv.log_tail(200), srv.log_tail(200)
    del ipc_dirs_before


def test_sigkill_decode_worker_migrates_streams_and_restarts_it(default_model_dir):
    """With migration (the default) the streams on the killed worker resume elsewhere: every
    client gets its full output, token-identical to the offline engine; the worker restarts.
    One stream is held to a JSON schema and is on the victim when it dies: its grammar resumes
    after the tokens already streamed, and its output still validates (issue 17)."""
    from tetri import LLM, SamplingParams
    from tetri.types import StructuredOutputsParams

    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2").start()
    try:
        model = srv.openai().models.list().data[0].id
        prompts = [[5 + i, 6, 7, 8 + i] for i in range(4)]
        client = srv.openai(timeout=120)
        held_ids: list[int] = []
        held_text: list[str] = []

        def stream(p):
            ids: list[int] = []
            _stream_into(client, model, p, ids, [], max_tokens=300, ignore_eos=True)
            return ids

        def stream_held():
            return _stream_into(client, model, HELD_PROMPT, held_ids, held_text, max_tokens=1500, structured_outputs=HELD)

        with cf.ThreadPoolExecutor(5) as pool:
            held = pool.submit(stream_held)
            # alone so far, so the one busy decode worker holds the constrained stream
            victim = _wait_for(lambda: next((w for w in _decoders(srv) if w["running"] > 0), None)
                               if len(held_ids) >= 10 else None, 60)
            assert victim is not None, "the constrained stream never got going"
            futs = [pool.submit(stream, p) for p in prompts]
            _wait_for(lambda: sum(w["running"] for w in _decoders(srv)) >= 3 or None, 20)  # plain ones decoding too
            emitted_at_kill = len(held_ids)
            os.kill(victim["pid"], signal.SIGKILL)
            got = [f.result(timeout=120) for f in futs]
            held_finish = held.result(timeout=300)
        llm = LLM(default_model_dir)
        want = llm.generate(prompts, SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True))
        assert got == [w.token_ids for w in want]  # nothing duplicated, nothing missing
        spec = StructuredOutputsParams(json=json.dumps(HELD_ITEMS), any_whitespace=False)
        held_want = llm.generate([HELD_PROMPT], SamplingParams(max_tokens=1500, temperature=0.0,
                                                               structured_outputs=spec))[0]
        assert emitted_at_kill < len(held_ids)  # the kill came mid-stream
        assert held_finish == "stop" and held_ids == held_want.token_ids
        jsonschema.validate(json.loads("".join(held_text)), HELD_ITEMS)
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
