"""Measure what the HTTP front end costs on one core, with an engine that costs nothing.

The server (app + `FakeEngineClient`, tokens produced every loop turn, `token_delay_s=0`)
runs in a spawned process pinned to one core; the load generator runs here, pinned to the
other cores where possible. Two figures:

1. streaming throughput: `--concurrency` clients each streaming `--tokens` tokens from
   /v1/chat/completions, repeated `--rounds` times: streamed tokens/s sustained by one core;
2. added latency: `--latency-requests` sequential non-streaming requests with max_tokens=1
   (p50/p99 round trip), next to GET /v1/models (the HTTP floor) on a kept-alive connection.

    python tools/bench_frontend.py [--concurrency 64 --tokens 256 --rounds 3]

Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time

import aiohttp

MODEL = "default-model-v1"


def _pin(cpus: set[int]) -> set[int] | None:
    try:
        os.sched_setaffinity(0, cpus)
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


def _server_main(port_q: mp.Queue, cpu: int | None) -> None:
    import uvloop

    from tetri.config import ServerConfig
    from tetri.server.app import create_app, start_app
    from tetri.server.fake_engine import FakeEngineClient
    from tetri.workers.models.default_model import ensure_default_model

    pinned = _pin({cpu}) if cpu is not None else None

    async def main() -> None:
        engine = FakeEngineClient(ensure_default_model(), max_model_len=8192, token_delay_s=0.0)
        runner, port = await start_app(create_app(ServerConfig(port=0), engine))
        port_q.put((port, sorted(pinned) if pinned else None))
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def _stream_one(s: aiohttp.ClientSession, url: str, tokens: int) -> int:
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": tokens,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    tail = b""
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for data in r.content.iter_any():
            tail = (tail + data)[-4096:]
    usage_line = [ln for ln in tail.split(b"\n\n") if b'"usage"' in ln][-1]
    return json.loads(usage_line.removeprefix(b"data: "))["usage"]["completion_tokens"]


async def _throughput(url: str, concurrency: int, tokens: int, rounds: int) -> list[float]:
    rates = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        await _stream_one(s, url, 8)  # warm-up
        for _ in range(rounds):
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(_stream_one(s, url, tokens) for _ in range(concurrency)))
            dt = time.perf_counter() - t0
            assert sum(counts) == concurrency * tokens, counts
            rates.append(sum(counts) / dt)
    return rates


async def _timed(s: aiohttp.ClientSession, method: str, url: str, n: int, body: dict | None = None) -> list[float]:
    out = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        async with s.request(method, url, json=body) as r:
            await r.read()
            assert r.status == 200, r.status
        if i >= 20:  # skip warm-up
            out.append(time.perf_counter() - t0)
    return out


async def _latency(url: str, n: int) -> tuple[list[float], list[float]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    async with aiohttp.ClientSession() as s:
        floor = await _timed(s, "GET", url + "/v1/models", n)
        req = await _timed(s, "POST", url + "/v1/chat/completions", n, body)
    return req, floor


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc), 0.0 elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-requests", type=int, default=500)
    ap.add_argument("--server-cpu", type=int, default=0, help="core for the server (-1: no pinning)")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    port_q: mp.Queue = ctx.Queue()
    cpu = None if args.server_cpu < 0 else args.server_cpu
    proc = ctx.Process(target=_server_main, args=(port_q, cpu), daemon=True)
    proc.start()
    try:
        port, server_cpus = port_q.get(timeout=120)
        others = (os.sched_getaffinity(0) - {cpu}) if hasattr(os, "sched_getaffinity") else set()
        client_cpus = _pin(others) if others and cpu is not None else None
        url = f"http://127.0.0.1:{port}"
        print(f"server pid {proc.pid} on cpus {server_cpus}; load generator on cpus {sorted(client_cpus) if client_cpus else 'any'}")
        cpu0 = _cpu_s(proc.pid)
        rates = asyncio.run(_throughput(url, args.concurrency, args.tokens, args.rounds))
        cpu_per_token = (_cpu_s(proc.pid) - cpu0) / ((args.rounds * args.concurrency + 1) * args.tokens)
        print(f"streaming: {args.concurrency} concurrent x {args.tokens} tokens, {args.rounds} rounds: "
              f"{statistics.median(rates):,.0f} tokens/s median (rounds: {', '.join(f'{r:,.0f}' for r in rates)})")
        print(f"server CPU per streamed token: {cpu_per_token * 1e6:.1f} us "
              f"(=> {1 / cpu_per_token if cpu_per_token else float('nan'):,.0f} tokens/s per fully used core)")
        req, floor = asyncio.run(_latency(url, args.latency_requests))
        ms = 1e3
        print(f"non-streaming max_tokens=1 round trip ({len(req)} sequential): p50 {_pct(req, .5) * ms:.2f} ms, "
              f"p99 {_pct(req, .99) * ms:.2f} ms, mean {statistics.mean(req) * ms:.2f} ms")
        print(f"GET /v1/models round trip (HTTP floor):            p50 {_pct(floor, .5) * ms:.2f} ms, "
              f"p99 {_pct(floor, .99) * ms:.2f} ms")
        print(f"front-end added latency per request (p50 minus floor): {(_pct(req, .5) - _pct(floor, .5)) * ms:.2f} ms")
    finally:
        proc.terminate()
        proc.join(10)


if __name__ == "__main__":
    main()
