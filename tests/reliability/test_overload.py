"""Overload (--max-queue 8) and graceful shutdown (--shutdown-timeout 3) of a live server.

Both run on the package's shared server (tests/reliability/conftest.py: 1 prefill + 1 decode,
--max-queue 8 --shutdown-timeout 3); the shutdown tests end it, so they run last.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import pytest

from tests.reliability.helpers import SERVED, ipc_dir_of, pid_alive, reference, shm_segments_of

MAX_QUEUE = 8
SHUTDOWN_TIMEOUT_S = 3.0


# ---- overload ------------------------------------------------------------------------------------


async def _burst(srv, prompts, max_tokens, decode_pid: int):
    """Post every prompt at once while the decode worker is stopped (SIGSTOP, by pid), so no
    admitted request can finish and free its place: exactly MAX_QUEUE are admitted, and every
    other one must come back refused while they are stuck. Then SIGCONT, and the admitted ones
    complete."""
    import aiohttp

    samples = []
    stop = asyncio.Event()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(prompts) + 8),
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def watch():
            while not stop.is_set():
                async with s.get(srv.base_url + "/workers") as r:
                    samples.append(await r.json())
                await asyncio.sleep(0.03)

        async def one(prompt):
            body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "return_token_ids": True}
            async with s.post(srv.base_url + "/v1/completions", json=body) as r:
                raw = await r.read()
                return {"status": r.status, "retry_after": r.headers.get("Retry-After"), "body": json.loads(raw),
                        "while_stopped": stopped}

        watcher = asyncio.create_task(watch())
        os.kill(decode_pid, signal.SIGSTOP)
        stopped = True
        try:
            tasks = [asyncio.create_task(one(p)) for p in prompts]
            returned = 0
            for fut in asyncio.as_completed(tasks, timeout=120):  # 120 s: only a hang takes that long
                await fut
                returned += 1
                if returned == len(prompts) - MAX_QUEUE:
                    break
            while len(samples) < 3:  # the board seen full at least a few times
                await asyncio.sleep(0.03)
        finally:
            stopped = False
            os.kill(decode_pid, signal.SIGCONT)
        try:
            results = await asyncio.gather(*tasks)
        finally:
            stop.set()
            await watcher
    return results, samples


def test_burst_past_max_queue_gets_429s_without_waiting_and_admitted_requests_complete(shared_server, offline):
    srv = shared_server
    assert srv.wait_idle(30)
    rng = random.Random(5)
    prompts = [[rng.randrange(4, 500) for _ in range(rng.randint(4, 120))] for _ in range(60)]
    decode_pid = next(w["pid"] for w in srv.workers() if w["role"] == "decode")
    results, samples = asyncio.run(_burst(srv, prompts, 32, decode_pid))

    statuses = [r["status"] for r in results]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in results if r["status"] == 429]
    admitted = [(p, r) for p, r in zip(prompts, results) if r["status"] == 200]
    print(f"{len(admitted)} admitted, {len(refused)} refused")
    assert len(admitted) == MAX_QUEUE and len(refused) == len(prompts) - MAX_QUEUE, statuses
    # a refusal does not wait for capacity: every 429 came back while no admitted request could end
    assert all(r["while_stopped"] for r in refused)
    for r in refused:
        assert r["retry_after"] is not None and int(r["retry_after"]) >= 1, r
        assert r["body"]["error"]["type"] == "rate_limit_error", r["body"]
    want = reference(offline, [p for p, _ in admitted], 32)
    got = [r["body"]["choices"][0]["token_ids"] for _, r in admitted]
    assert got == want
    assert all(r["body"]["choices"][0]["finish_reason"] == "length" for _, r in admitted)

    worst_front = max(s["num_running"] for s in samples)
    worst_role = max(sum(w["running"] + w["waiting"] for w in s["workers"] if w["role"] == role)
                     for s in samples for role in ("prefill", "decode"))
    assert worst_front <= MAX_QUEUE and worst_role <= MAX_QUEUE, (worst_front, worst_role)
    assert worst_front >= 1
    assert srv.wait_idle(30)


# ---- graceful shutdown (ends the shared server) ----------------------------------------------


async def _stream(session, url: str, body: dict, started: asyncio.Event) -> dict:
    import aiohttp

    rec = {"status": None, "tokens": [], "finish_reason": None, "done": False, "error_event": None, "exc": None}
    try:
        async with session.post(url, json=body) as r:
            rec["status"] = r.status
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    rec["done"] = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    rec["error_event"] = obj["error"]
                    continue
                for ch in obj.get("choices") or []:
                    rec["tokens"] += ch.get("token_ids") or []
                    rec["finish_reason"] = ch.get("finish_reason") or rec["finish_reason"]
                started.set()
    except (aiohttp.ClientError, ConnectionError) as e:
        rec["exc"] = f"{type(e).__name__}: {e}"
    finally:
        started.set()
        rec["ended_at"] = time.monotonic()
    return rec


async def _drain_seen(srv, t_sig: float, timeout_s: float = 5.0) -> float | None:
    """Seconds after SIGTERM until /health stops answering 200 (503, or the port closed)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while time.monotonic() - t_sig < timeout_s:
            try:
                async with s.get(srv.base_url + "/health") as r:
                    if r.status != 200:
                        return round(time.monotonic() - t_sig, 2)
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                return round(time.monotonic() - t_sig, 2)
            await asyncio.sleep(0.05)
    return None


async def _shutdown_scenario(srv, num_long: int = 5, long_tokens: int = 4000, short_tokens: int = 24) -> dict:
    import aiohttp

    url = srv.base_url + "/v1/completions"
    obs: dict = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as s:

        def start(prompt, n):
            ev = asyncio.Event()
            body = {"model": SERVED, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "stream": True,
                    "ignore_eos": True, "return_token_ids": True}
            return asyncio.create_task(_stream(s, url, body, ev)), ev

        longs = [start([5 + i, 6, 7, 8], long_tokens) for i in range(num_long)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for _, ev in longs)), 60)
        obs["short_prompts"] = [[20 + i, 21, 22] for i in range(2)]
        shorts = [start(p, short_tokens) for p in obs["short_prompts"]]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for _, ev in shorts)), 60)
        obs["shorts_in_flight_at_sigterm"] = sum(not t.done() for t, _ in shorts)
        obs["t_sig"] = t_sig = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        obs["drain_seen_after_s"] = await _drain_seen(srv, t_sig)
        try:  # a new request while draining
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s2:
                async with s2.post(url, json={"model": SERVED, "prompt": [5], "max_tokens": 2}) as r:
                    obs["new_request"] = r.status
        except (aiohttp.ClientConnectorError, ConnectionRefusedError):
            obs["new_request"] = "connection refused"
        except aiohttp.ClientError as e:
            obs["new_request"] = f"{type(e).__name__}"
        tasks = [t for t, _ in longs + shorts]
        done, pending = await asyncio.wait(tasks, timeout=2 * SHUTDOWN_TIMEOUT_S + 30)
        for t in pending:
            t.cancel()
        obs["longs"] = [t.result() if t in done else {"hung": True} for t, _ in longs]
        obs["shorts"] = [t.result() if t in done else {"hung": True} for t, _ in shorts]
    for rec in obs["longs"] + obs["shorts"]:
        if "ended_at" in rec:
            rec["ended_after_sigterm_s"] = round(rec.pop("ended_at") - t_sig, 2)
            rec["num_tokens"] = len(rec["tokens"])
    return obs


@pytest.fixture(scope="module")
def shutdown_run(shared_server):
    """SIGTERM the shared server with 5 long and 2 short streams in flight; what was seen."""
    srv = shared_server
    assert srv.wait_idle(30)
    pids = [srv.proc.pid] + [w["pid"] for w in srv.workers()]
    segments = shm_segments_of(pids)
    ipc = ipc_dir_of(srv.proc.pid)
    assert ipc and any(s.startswith("tetri-kv-") for s in segments), (ipc, segments)
    obs = asyncio.run(_shutdown_scenario(srv))
    try:
        obs["exit_code"] = srv.proc.wait(60)
    except Exception:  # noqa: BLE001 - reported by the test
        obs["exit_code"] = "did not exit"
    obs["exited_after_sigterm_s"] = round(time.monotonic() - obs["t_sig"], 2)
    obs["alive_pids"] = [p for p in pids if pid_alive(p)]
    obs["segments_left"] = sorted(s for s in segments if os.path.exists(f"/dev/shm/{s}"))
    obs["ipc_dir_left"] = os.path.exists(ipc)
    obs["log"] = srv.log_tail(40)
    return obs


def _brief(obs: dict) -> dict:
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens"}  # noqa: E731
    return {**{k: v for k, v in obs.items() if k not in ("longs", "shorts", "log")},
            "longs": [strip(r) for r in obs["longs"]], "shorts": [strip(r) for r in obs["shorts"]]}


@pytest.mark.run_last
def test_graceful_shutdown_drains_refuses_and_leaves_nothing(shutdown_run, offline):
    obs, brief = shutdown_run, _brief(shutdown_run)
    print(json.dumps(brief))
    # requests in flight that fit in the timeout finish normally, with the right tokens
    for rec, prompt in zip(obs["shorts"], obs["short_prompts"]):
        assert rec.get("done") and rec["finish_reason"] == "length" and not rec["exc"] and not rec["error_event"], brief
    assert [r["tokens"] for r in obs["shorts"]] == reference(offline, obs["short_prompts"], 24)
    # the long ones (5 x 4000 tokens: far more than a CPU decodes in the grace period) are cut:
    # each stream ends, never hangs, soon after the timeout
    cut = [r for r in obs["longs"] if not (r.get("done") and r.get("finish_reason") == "length")]
    assert cut, f"every long stream finished within the grace period: nothing was cut: {brief}"
    for rec in obs["longs"]:
        assert not rec.get("hung"), brief  # every stream ends (the scenario waits 2 x timeout + 30 s)
    for rec in cut:
        assert rec["error_event"] or rec["exc"], brief  # a cut stream is visibly not a complete one
    # admission stopped at once: /health said so while the long streams were still running
    assert obs["drain_seen_after_s"] is not None, brief
    assert obs["drain_seen_after_s"] < min(rec["ended_after_sigterm_s"] for rec in cut), brief
    assert obs["new_request"] in (503, "connection refused"), brief
    assert obs["exit_code"] == 0, obs["log"]
    assert obs["alive_pids"] == [] and obs["segments_left"] == [] and not obs["ipc_dir_left"], brief
    assert "Traceback" not in obs["log"], obs["log"]


@pytest.mark.run_last
def test_shutdown_ends_unfinished_streams_with_an_error_event_on_time(shutdown_run):
    """Each long stream gets an SSE error event (the client does not just see the connection
    drop), and not before the grace period is over (it may finish in it). No upper bound in
    seconds: a busy machine may take its time; a hang is caught by the scenario's own wait."""
    brief = _brief(shutdown_run)
    for rec in shutdown_run["longs"]:
        assert rec["error_event"] is not None and not rec.get("hung"), brief
        assert rec["ended_after_sigterm_s"] >= SHUTDOWN_TIMEOUT_S, brief
