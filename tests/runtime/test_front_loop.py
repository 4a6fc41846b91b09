"""The front's event loop and its links to the workers (issue 20, items 4 to 7): control
messages are never dropped, messages are handled through one receive path in order, the
length log forgets every ended request, and nothing slow runs on the loop while a worker is
killed and restarted. Real ZeroMQ sockets, real worker processes."""

import asyncio
import collections
import json
import os
import signal
import threading
import time

import zmq
import zmq.asyncio

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.launch import LaunchConfig, WorkerSpec
from tetri.protocol import Release, TokenBatch, encode
from tetri.sched.front import FrontConfig
from tetri.server.engine_api import EngineRequest
from tetri.server.engine_client import RuntimeClient
from tetri.server.length_log import LengthLog
from tetri.server.worker_links import WorkerLinks
from tetri.types import SamplingParams


async def _recv_all(sock, n: int, timeout_s: float = 30.0) -> list[bytes]:
    return [await asyncio.wait_for(sock.recv(), timeout_s) for _ in range(n)]


async def test_sends_to_a_worker_that_stops_reading_are_queued_in_order_not_dropped(tmp_path):
    zctx = zmq.asyncio.Context()
    endpoint = lambda wid: f"ipc://{tmp_path}/w{wid}.sock"  # noqa: E731
    worker = zctx.socket(zmq.PULL)
    worker.setsockopt(zmq.RCVHWM, 4)
    worker.bind(endpoint(0))
    failures = collections.Counter()
    links = WorkerLinks(zctx, endpoint, 1, lambda reason, n: failures.update({reason: n}), send_hwm=4)
    try:
        msgs = [encode(Release(req_id=f"r{i:04d}" + "x" * 20000)) for i in range(400)]  # ~8 MB: past every buffer
        for raw in msgs:
            links.send(0, raw)  # never raises, never blocks the loop
        assert failures["deferred"] >= 1 and links.backlog(0) > 0
        assert await _recv_all(worker, len(msgs)) == msgs  # every one, in order
        await asyncio.sleep(0.05)
        assert links.backlog(0) == 0
    finally:
        await links.close()
        links.close_sockets()
        worker.close(linger=0)
        zctx.term()


async def test_a_dead_workers_queue_never_reaches_its_restart(tmp_path):
    """ZeroMQ would deliver what was queued for a dead peer to the process that binds its
    endpoint next (it did, before `reset`); `reset` discards it with the old socket."""
    zctx = zmq.asyncio.Context()
    endpoint = lambda wid: f"ipc://{tmp_path}/w{wid}.sock"  # noqa: E731
    dead = zctx.socket(zmq.PULL)
    dead.bind(endpoint(0))
    failures = collections.Counter()
    links = WorkerLinks(zctx, endpoint, 1, lambda reason, n: failures.update({reason: n}))
    try:
        links.send(0, b"before")
        assert await _recv_all(dead, 1) == [b"before"]
        dead.close(linger=0)  # the worker dies; the front sends before it notices
        await asyncio.sleep(0.05)
        for i in range(3):
            links.send(0, b"stale%d" % i)
        links.reset(0)
        restarted = zctx.socket(zmq.PULL)
        restarted.bind(endpoint(0))
        links.send(0, b"fresh")
        assert await _recv_all(restarted, 1) == [b"fresh"]
        assert not await restarted.poll(200)
        restarted.close(linger=0)
    finally:
        await links.close()
        links.close_sockets()
        zctx.term()


async def test_a_death_first_handles_what_the_worker_sent_in_order(default_model_dir):
    """Every message a worker sent before its death is handled, in the order it was sent,
    through the one receive path, before its requests are migrated or failed; messages that
    arrive while the receive loop runs go through the same path, in order too."""
    client = _client(default_model_dir, max_restarts=0)
    client.wire()
    events: list = []
    client._on_message = lambda msg: events.append(msg.token_ids[0])
    dead = client.scheduler.on_worker_dead
    client.scheduler.on_worker_dead = lambda wid, *a, **k: (events.append(f"dead {wid}"), dead(wid, *a, **k))[1]
    client.board.write(0, role="decode", state="ready", pid=0, total_blocks=8, free_blocks=8)
    sender = zmq.Context()
    push = sender.socket(zmq.PUSH)
    push.connect(client.procs.front_endpoint)
    recv = asyncio.get_running_loop().create_task(client._recv_loop())
    try:
        batch = lambda i: encode(TokenBatch(worker_id=0, req_ids=["r"], choices=[0], token_ids=[i],  # noqa: E731
                                            finish_reasons=[None]))
        for i in range(50):
            push.send(batch(i))
        while len(events) < 50:  # the receive loop takes them as they come
            await asyncio.sleep(0.01)
        for i in range(50, 300):
            push.send(batch(i))
        time.sleep(0.2)  # delivered, not yet handled: the loop has not run since
        client._on_dead(0, "stopped heartbeating")  # what the supervisor does on a stale row
        await asyncio.sleep(0.1)
    finally:
        recv.cancel()
        push.close(linger=0)
        sender.term()
        await client.close()
    assert events == [*range(300), "dead 0"]


def _client(model_dir: str, roles=("prefill", "decode"), collect_hidden=False, heartbeat_timeout_s=30.0,
            **kw) -> RuntimeClient:
    launch = LaunchConfig(workers=tuple(WorkerSpec(r) for r in roles), collect_hidden=collect_hidden,
                          heartbeat_timeout_s=heartbeat_timeout_s)
    return RuntimeClient(ModelConfig(model=model_dir), CacheConfig(num_blocks=256), EngineSchedConfig(chunk_size=32),
                         FrontConfig(chunk_size=32), launch, **kw)


class LoopLag:
    """Longest delay of a 5 ms sleep on the event loop: how long the loop was blocked."""

    def __init__(self) -> None:
        self.worst_s = 0.0
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.005)
            self.worst_s = max(self.worst_s, time.monotonic() - t0 - 0.005)

    def stop(self) -> float:
        self._task.cancel()
        return self.worst_s


class OnLoop:
    """Records, per kind of slow call, whether it ever ran on the event loop's thread."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.calls: dict[str, list[bool]] = collections.defaultdict(list)

    def wrap(self, kind: str, fn):
        def wrapped(*args, **kwargs):
            self.calls[kind].append(threading.get_ident() == self.loop_thread)
            return fn(*args, **kwargs)

        return wrapped


class _RecordedFile:
    def __init__(self, f, on_loop: OnLoop) -> None:
        self._f = f
        self.write = on_loop.wrap("length-log write", f.write)
        self.flush = on_loop.wrap("length-log flush", f.flush)

    def __getattr__(self, name):
        return getattr(self._f, name)


async def _collect(stream) -> tuple[dict[int, list[int]], str | None]:
    tokens: dict[int, list[int]] = collections.defaultdict(list)
    async for out in stream:
        if out.error:
            return tokens, out.error
        for ch in out.choices:
            tokens[ch.index] += ch.token_ids
    return tokens, None


MAX_TOKENS = 80  # 20 before the hang, the rest migrated


async def test_nothing_slow_runs_on_the_event_loop_while_a_worker_is_killed(
        default_model_dir, probe_dir, tmp_path, monkeypatch):
    """With --log-lengths and a learned predictor: the tokenizer load, the prompt decodes, the
    predictor's inference, the length log's writes and the hung worker's join all run off
    the event-loop thread (each used to run on it: the first tokenizer load alone blocks the
    loop for seconds in a fresh process), printing the loop's longest stall while a hung decode
    worker is found (its heartbeat stops), SIGKILLed, reaped, its requests migrated and it
    restarts. Afterwards the length log holds no request: finished, failed and
    aborted ones are all forgotten."""
    import multiprocessing.process
    import transformers

    from tetri.predictor.model import load_predictor

    on_loop = OnLoop()
    load = transformers.AutoTokenizer.from_pretrained

    def load_tokenizer(*args, **kwargs):
        tok = on_loop.wrap("tokenizer load", load)(*args, **kwargs)
        tok.decode = on_loop.wrap("prompt decode", tok.decode)
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load_tokenizer)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "join",
                        on_loop.wrap("worker join", multiprocessing.process.BaseProcess.join))
    predictor = load_predictor(probe_dir[0])
    predictor.predict = on_loop.wrap("predictor inference", predictor.predict)
    log = LengthLog(str(tmp_path))
    log._file = _RecordedFile(log._file, on_loop)
    client = _client(default_model_dir, ("prefill", "decode", "decode"), collect_hidden=True, length_log=log,
                     predictor=predictor, heartbeat_timeout_s=5.0)
    await client.start()
    lag = LoopLag()
    await asyncio.sleep(0.02)  # the probe is asleep: whatever blocks the loop from here is measured
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        n2 = SamplingParams(n=2, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        streams = [client.submit(EngineRequest(req_id=f"r{i}", prompt_token_ids=[5 + i, 6, 7, 8],
                                               params=params if i else n2)) for i in range(6)]
        results = asyncio.gather(*(_collect(s) for s in streams))
        while len(client.scheduler.reqs["r1"].output_ids) < 20:  # tokens flowing
            await asyncio.sleep(0.01)
        victim = client.scheduler.reqs["r1"].decode_worker
        os.kill(client.procs.pid(victim), signal.SIGSTOP)  # hung: alive, not beating; the front kills it
        outs = await asyncio.wait_for(results, 120)
        while client.dead:  # its restart is back
            await asyncio.sleep(0.05)
        worst = lag.stop()
        restarts = dict(client.procs.restarts)
        calls = {kind: list(flags) for kind, flags in on_loop.calls.items()}
        client.submit(EngineRequest(req_id="gone", prompt_token_ids=[9, 9, 9], params=params))
        client.abort("gone")
    finally:
        await client.close()
    print(f"\nlongest event-loop stall while a worker was killed: {worst * 1000:.1f} ms")
    assert restarts.get(victim) == 1  # (at load 16 a 1.5 s timeout also took a healthy one)
    kinds = ("tokenizer load", "prompt decode", "predictor inference", "length-log write", "worker join")
    assert [k for k in kinds if not calls.get(k)] == [], calls  # each ran
    assert [k for k in kinds if any(calls[k])] == [], calls  # none on the loop's thread
    (_, n2_error), rest = outs[0], outs[1:]
    assert [err for _, err in rest] == [None] * 5 and all(len(t[0]) == MAX_TOKENS for t, _ in rest)  # migrated, whole
    assert n2_error is None or "died" in n2_error  # n > 1 is not migrated: it fails if it was on the victim
    assert log.num_live == 0
    lines = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert len(lines) == 5 + (2 if n2_error is None else 0)
    assert all(x["output_tokens"] == MAX_TOKENS and x["prompt"] and len(x["hidden"]) == 128 for x in lines)
    # The stall is printed, not bounded: on 2 cores shared at load 16 the loop stalled 2.4 s
    # with nothing of ours on it. What each old blocking call did is checked above by thread.
