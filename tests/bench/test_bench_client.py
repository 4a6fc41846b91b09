"""The streaming client against a fake OpenAI-compatible server (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter

import numpy as np
import pytest

from tetri.bench import build_report, client
from tetri.bench.records import Slo
from tetri.bench.report import REPORT_KEYS, SLO_KEYS
from tetri.bench.workload import Request, poisson_arrivals_s, sample_workload, with_arrivals


def small_workload(n: int = 20, seed: int = 0) -> list[Request]:
    return sample_workload("random", n, np.random.default_rng(seed), max_prompt_tokens=48,
                           max_output_tokens=12)


def check_records_match(records, reqs, state):
    assert len(records) == len(reqs)
    for rec, req in zip(records, reqs):
        assert rec.ok, rec.error
        assert rec.prompt_tokens == req.prompt_tokens
        assert rec.output_tokens == req.output_tokens
        assert 0.0 < rec.ttft_s <= rec.e2e_s
        assert len(rec.itl_s) == rec.output_tokens - 1
        assert all(gap >= 0 for gap in rec.itl_s)
        if rec.output_tokens > 1:
            assert 0.0 <= rec.tpot_s <= rec.e2e_s
    # the server saw prompts of exactly the requested lengths, asked for the requested outputs
    assert Counter(state.seen) == Counter((r.prompt_tokens, r.output_tokens) for r in reqs)


def check_report(report, n):
    assert set(report) == REPORT_KEYS | SLO_KEYS
    assert report["completed"] == n and report["failed"] == 0
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        stats = report[key]
        assert set(stats) == {"mean", "p50", "p90", "p99"}
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"]
    assert report["ttft_s"]["p50"] <= report["e2e_s"]["p50"]
    assert report["tpot_s"]["mean"] <= report["e2e_s"]["mean"]
    assert report["slo_attainment"] == 1.0  # generous SLO
    assert report["goodput"] == pytest.approx(report["request_throughput"])


async def test_open_loop_rate_run(fake_server):
    reqs = small_workload()
    reqs = with_arrivals(reqs, poisson_arrivals_s(len(reqs), 200.0, np.random.default_rng(0)))
    done = []
    records, duration_s = await client.run_requests(fake_server.url, reqs, model="fake", on_done=done.append)
    assert len(done) == 20 and duration_s > 0
    check_records_match(records, reqs, fake_server.state)
    assert [rec.arrival_s for rec in records] == sorted(rec.arrival_s for rec in records)
    report = build_report(records, duration_s, Slo(ttft_s=60, tpot_s=60))
    check_report(report, 20)
    assert report["mean_output_tokens"] == pytest.approx(np.mean([r.output_tokens for r in reqs]))
    assert report["output_token_throughput"] == pytest.approx(sum(r.output_tokens for r in reqs) / duration_s)
    body = fake_server.state.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"]
    assert all(10 <= t < client.DEFAULT_VOCAB_SIZE for t in body["prompt"])


async def test_closed_loop_concurrency_run(fake_server):
    reqs = with_arrivals(small_workload(seed=1), [None] * 20)
    records, duration_s = await client.run_requests(fake_server.url + "/v1/", reqs, model="fake",
                                                    concurrency=4)
    check_records_match(records, reqs, fake_server.state)
    assert fake_server.state.max_in_flight <= 4
    check_report(build_report(records, duration_s, Slo(ttft_s=60, tpot_s=60)), 20)


async def test_failed_requests_are_counted(fake_server):
    reqs = small_workload()
    records, duration_s = await client.run_requests(fake_server.url, reqs, model="flaky-4", concurrency=3)
    report = build_report(records, duration_s, Slo(ttft_s=60, tpot_s=60))
    assert report["completed"] == 15 and report["failed"] == 5
    assert report["slo_attainment"] == pytest.approx(15 / 20)
    failed = [r for r in records if not r.ok]
    assert all(r.error.startswith("HTTP 500") and "injected failure" in r.error for r in failed)
    assert all(r.ttft_s is None and r.output_tokens == 0 for r in failed)


async def test_tokens_counted_from_chunks_without_usage(fake_server):
    reqs = small_workload(5)
    records, _ = await client.run_requests(fake_server.url, reqs, model="nousage")
    assert [r.output_tokens for r in records] == [r.output_tokens for r in reqs]


async def test_chat_endpoint(fake_server):
    reqs = small_workload(6)
    records, _ = await client.run_requests(fake_server.url, reqs, model="fake", endpoint="chat", concurrency=2)
    assert all(r.ok for r in records)
    # the role-only first chunk is not a token: one gap fewer than tokens
    assert all(len(r.itl_s) == r.output_tokens - 1 for r in records)
    assert [r.output_tokens for r in records] == [r.output_tokens for r in reqs]
    assert Counter(p for p, _ in fake_server.state.seen) == Counter(r.prompt_tokens for r in reqs)


async def test_timeout_and_refused_connection_fail_cleanly(fake_server):
    records, _ = await client.run_requests(fake_server.url, [Request(8, 4, 0.0)], model="slow",
                                           request_timeout_s=0.2)
    assert not records[0].ok and "timeout" in records[0].error
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records, _ = await client.run_requests(f"http://127.0.0.1:{port}", [Request(8, 4, 0.0)] * 2, model="x")
    assert [r.ok for r in records] == [False, False] and all(r.error for r in records)


async def test_duration_stops_closed_loop(fake_server):
    reqs = with_arrivals(small_workload(), [None] * 20)
    records, _ = await client.run_requests(fake_server.url, reqs, model="fake", concurrency=1,
                                           duration_s=1e-9)
    assert len(records) == 0 or len(records) == 1  # nothing new after the deadline


async def test_fetch_model_name(fake_server):
    assert await client.fetch_model_name(fake_server.url) == "fake"


def test_sse_parser_handles_split_and_crlf():
    stream = (b": keep-alive\r\n\r\ndata: {\"a\": 1}\r\n\r\nevent: x\ndata:{\"b\":\n"
              b"data: 2}\n\ndata: [DONE]\n\n")
    parser, events = client.SseParser(), []
    for i in range(len(stream)):  # one byte at a time
        events += parser.feed(stream[i:i + 1])
    assert events == ['{"a": 1}', '{"b":\n2}', "[DONE]"]
    tail = client.SseParser()
    assert tail.feed(b"data: last") == [] and tail.close() == ["last"]


def test_prompt_ids_and_text():
    ids = client.prompt_token_ids(3, 500, vocab_size=300, seed=1)
    assert len(ids) == 500 and min(ids) >= 10 and max(ids) < 300
    assert ids == client.prompt_token_ids(3, 500, vocab_size=300, seed=1)
    assert ids != client.prompt_token_ids(4, 500, vocab_size=300, seed=1)
    assert len(client.prompt_text(0, 40).split()) == 40
    assert client.normalize_base_url("http://127.0.0.1:9/v1/") == "http://127.0.0.1:9"
    with pytest.raises(ValueError):
        client.prompt_token_ids(0, 5, vocab_size=10)


class ClosesReusedConnections:
    """A raw asyncio HTTP/1.1 server that answers the first request of every connection with
    keep-alive, then drops the connection when the client reuses it (as a server whose idle
    timeout fires just as the next request arrives: the client's write or first read fails)."""

    def __init__(self) -> None:
        self.answered = 0
        self.dropped_on_reuse = 0
        self.server: asyncio.base_events.Server | None = None
        self.url = ""

    async def start(self) -> ClosesReusedConnections:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if served:  # a reused connection: drop it without an answer
                    self.dropped_on_reuse += 1
                    writer.transport.abort()
                    return
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = json.loads(await reader.readexactly(length))
                events = [{"choices": [{"index": 0, "text": f" t{i}"}]} for i in range(body["max_tokens"])]
                events.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
                sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(sse) + sse)
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_a_request_on_a_connection_the_server_closed_is_resent_on_a_new_one():
    """The load generator against a server that closes keep-alive connections: every request
    still succeeds, each answered exactly once, and the ones whose pooled connection was
    dropped are marked as re-sent."""
    server = await ClosesReusedConnections().start()
    try:
        reqs = [Request(8, 3, None)] * 6
        records, _ = await client.run_requests(server.url, reqs, model="m", concurrency=2)
    finally:
        await server.close()
    assert [r.error for r in records] == [None] * 6
    assert all(r.ok and r.output_tokens == 3 for r in records)
    assert server.dropped_on_reuse >= 1 and server.answered == 6  # each request answered once
    assert sum(r.resent for r in records) == server.dropped_on_reuse
