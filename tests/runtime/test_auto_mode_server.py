"""`tetri-serve --mode auto` as a user runs it: tetri-plan's start, then the role policy moving
workers with the load. Long prompts starve prefill (a mixed worker drains and becomes a prefill
worker); then long decodes starve decode (the prefill worker flips in place back to mixed).
Each decision shows in /workers, /metrics and the log, with its reason, and every request ends
with the greedy tokens the colocated server gives.

No race with the policy's clock: each phase is a closed loop (`Feeder`) that keeps the same
number of requests in flight, replacing each one as it ends, until /workers shows the decision
the phase is for. The load the policy reacts to thus lasts until the policy has reacted, however
fast or slow the host is (a fixed burst could be over before the hold and the tick came round).
Other decisions may come too (the assertions look for these two, with their reasons)."""

from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor


from tests.runtime.server_proc import ServerProc

ROLE_FLAGS = ["--role-busy-tokens", "64", "--role-dwell-s", "0.1", "--role-worker-dwell-s", "0.5",
              "--role-tpot-s", "0.0005"]
"""Sensitive on purpose (the embedded model is fast): any queued chunk starves prefill, any
decode step is too slow for the declared pace."""
CHUNK = ["--chunk-size", "128"]
DECIDE_TIMEOUT_S = 180.0
"""A deadline for a decision that never comes (the test then fails); not a speed bound."""


def long_prompt(i: int) -> tuple[list[int], int]:
    """Phase 1's i-th request: a long prompt, one token (prefill work only)."""
    rng = random.Random(i)
    return [rng.randrange(3, 500) for _ in range(512)], 1


def long_decode(i: int) -> tuple[list[int], int]:
    """Phase 2's i-th request: a short prompt, a long decode."""
    rng = random.Random(100_000 + i)
    return [rng.randrange(3, 500) for _ in range(12)], 128


def complete(client, model: str, req) -> list[int]:
    prompt, max_tokens = req
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    ch = out.choices[0]
    return getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids")


class Feeder:
    """`width` client threads, each sending `make(i)` for the next i as soon as its last request
    ended, until `stop()`; `results()`: the tokens of requests 0..n-1, every one sent."""

    def __init__(self, srv: ServerProc, make, width: int) -> None:
        self.client = srv.openai(timeout=300)
        self.model = self.client.models.list().data[0].id
        self.make = make
        self.got: dict[int, list[int]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(width)
        self._loops = [self._pool.submit(self._loop) for _ in range(width)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                i, self._next = self._next, self._next + 1
            self.got[i] = complete(self.client, self.model, self.make(i))

    def stop(self) -> list[list[int]]:
        self._stop.set()
        for loop in self._loops:
            loop.result()  # a request that failed fails the test here
        self._pool.shutdown()
        assert sorted(self.got) == list(range(len(self.got)))
        return [self.got[i] for i in range(len(self.got))]


def decision(body: dict, from_role: str, to_role: str, kind: str) -> dict | None:
    return next((d for d in body["roles"]["recent_decisions"]
                 if (d["from_role"], d["to_role"], d["reason_kind"]) == (from_role, to_role, kind)), None)


def wait_for(srv: ServerProc, check, timeout_s: float = DECIDE_TIMEOUT_S) -> dict:
    """Poll /workers until `check(body)` (the supervisor ticks every 0.1 s); the last body."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = srv.get("/workers")[1]
        if check(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def run_phase(srv: ServerProc, make, width: int, want: tuple[str, str, str]) -> tuple[list[list[int]], dict]:
    """Keep `width` requests of `make` in flight until /workers shows the decision `want`."""
    feed = Feeder(srv, make, width)
    try:
        body = wait_for(srv, lambda b: decision(b, *want) is not None)
    finally:
        got = feed.stop()
    return got, body


def colocated_tokens(ref: ServerProc, got1: list, got2: list) -> list[list[int]]:
    """The colocated server's greedy tokens for every request the two phases sent."""
    client = ref.openai(timeout=300)
    model = client.models.list().data[0].id
    reqs = [long_prompt(i) for i in range(len(got1))] + [long_decode(i) for i in range(len(got2))]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda req: complete(client, model, req), reqs))


def test_auto_mode_moves_workers_with_the_load():
    srv = ServerProc("--device", "cpu", "--mode", "auto", "--workers", "2", *CHUNK, *ROLE_FLAGS, "--log-level", "info")
    ref = ServerProc("--device", "cpu", "--mode", "colocated", "--workers", "2", *CHUNK)
    try:
        with ThreadPoolExecutor(2) as pool:  # both load at once (the colocated one idles until the end)
            list(pool.map(ServerProc.start, (srv, ref)))
        run_auto_phases(srv, ref)
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(ServerProc.stop, (srv, ref)))


def run_auto_phases(srv: ServerProc, ref: ServerProc) -> None:
    try:
        body = srv.get("/workers")[1]
        assert body["roles"]["mode"] == "auto" and body["roles"]["start"]["source"] == "tetri-plan"
        start = [w["role"] for w in body["workers"]]
        assert start == ["mixed", "mixed"], start  # tetri-plan's pick for these SLOs: colocated-chunked
        got1, body = run_phase(srv, long_prompt, 12, ("mixed", "prefill", "prefill_starved"))
        drain = decision(body, "mixed", "prefill", "prefill_starved")
        assert drain is not None, body
        # the drain runs its course: the worker ends as an active prefill worker
        drained = wait_for(srv, lambda b: any(w["worker_id"] == drain["worker_id"] and w["role"] == "prefill"
                                              and w["flip_state"] == "active" for w in b["workers"]))
        assert any(w["worker_id"] == drain["worker_id"] and w["role"] == "prefill" and w["flip_state"] == "active"
                   for w in drained["workers"]), drained
        got2, body = run_phase(srv, long_decode, 8, ("prefill", "mixed", "decode_starved"))
        assert srv.wait_idle(60)
        body = srv.get("/workers")[1]
        metrics = srv.get("/metrics")[1]
    finally:
        srv.stop()
        with open(srv.log.name) as f:
            log = f.read()
    back = decision(body, "prefill", "mixed", "decode_starved")
    assert back is not None, body["roles"]
    for row in (drain, back):
        assert row["reason"].startswith(row["reason_kind"].replace("_", " ")) and row["time_unix_s"] > 0, row
        assert f"worker {row['worker_id']} {row['from_role']} -> {row['to_role']}" in row["reason"], row
        assert f"role change: worker {row['worker_id']} {row['from_role']} -> {row['to_role']} ({row['reason']})" in log
    assert back["time_unix_s"] >= drain["time_unix_s"]
    assert body["roles"]["last_decision"] == body["roles"]["recent_decisions"][-1]
    pattern = r'tetri:role_changes_total\{from_role="(\w+)",reason="(\w+)",to_role="(\w+)"\} (\S+)'
    counted = {(f, r, t): float(v) for f, r, t, v in re.findall(pattern, metrics)}
    assert counted[("mixed", "prefill_starved", "prefill")] >= 1 and counted[("prefill", "decode_starved", "mixed")] >= 1
    assert sum(counted.values()) == body["roles"]["decisions_total"]
    assert len(re.findall(r"role change: worker \d+ \w+ -> \w+ \(", log)) == body["roles"]["decisions_total"]
    # greedy tokens equal the colocated server's for every request sent, across the flips
    assert got1 + got2 == colocated_tokens(ref, got1, got2)
    assert len(got2) >= 8 and all(len(ids) == 128 for ids in got2)
