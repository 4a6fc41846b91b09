"""A real `tetri-serve` with tiny KV pools (131 blocks of 16 tokens per worker: max_model_len
is capped to 2096) and the official OpenAI client (issue 20, items 1, 2, 8 and 10).

The tests share one server and run in file order; the last one kills a decode worker."""

import concurrent.futures as cf
import contextlib
import os
import random
import signal
import time

import openai
import pytest

from tests.runtime.server_proc import ServerProc

POOL_TOKENS = 131 * 16  # --kv-cache-gb 0.002: 2 GiB/1000 over 16 KiB blocks of the default model


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2", "--kv-cache-gb", "0.002",
                     "--chunk-size", "32", "--heartbeat-timeout-s", "600").start()  # SIGSTOPs here are not deaths
    try:
        yield srv, srv.openai().models.list().data[0].id
    finally:
        srv.stop()


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


def _pid_of(srv, role: str) -> list[int]:
    return [w["pid"] for w in srv.workers() if w["role"] == role and w["state"] != "dead"]


def _row(srv, role: str) -> dict:
    return next(w for w in srv.workers() if w["role"] == role and w["state"] != "dead")


def _resume(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _wait(cond, what, timeout_s: float = 30.0) -> None:
    """Poll `cond` until it holds; `what` (a string, or a callable giving one) explains a timeout."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.02)


def _cpu_s(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_over_long_prompt_gets_a_400_at_once_and_the_next_request_is_served(server):
    srv, model = server
    assert srv.openai().models.list().data[0].model_extra["max_model_len"] == POOL_TOKENS
    client = srv.openai(timeout=30)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=_prompt(POOL_TOKENS + 400, 1), max_tokens=4)
    print(f"\nover-long prompt refused in {time.monotonic() - start:.3f} s")
    assert f"maximum context length is {POOL_TOKENS}" in str(err.value)
    out = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4


def test_choices_that_no_decode_pool_holds_get_a_400(server):
    """Each choice needs its own blocks on a decode worker: 3 x 63 blocks > 131."""
    srv, model = server
    client = srv.openai(timeout=30)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=_prompt(1000, 2), max_tokens=4, n=3)
    assert "n=3" in str(err.value) and "decode" in str(err.value)
    out = client.completions.create(model=model, prompt=_prompt(1000, 2), max_tokens=4, n=2, temperature=0.0,
                                    extra_body={"ignore_eos": True})  # 2 x 63 blocks fit
    assert [c.finish_reason for c in out.choices] == ["length", "length"]
    assert srv.wait_idle()


def test_a_better_priority_is_prefilled_ahead_of_the_queue(server):
    """Every worker is stopped while six prompts with priority 1, then one with priority -5,
    queue in the front. The decode workers stay stopped, so the prefill pool fills after
    four prompts (4 x 32 of 131 blocks) and the system freezes: the four that got their
    first token are the first four in prefill order. The urgent prompt is among them (FCFS
    would leave it out); no timing is compared."""
    srv, model = server
    (prefill,) = _pid_of(srv, "prefill")
    decodes = _pid_of(srv, "decode")
    client = srv.openai(timeout=120)
    first_token: list[str] = []

    def run(name: str, priority: int, seed: int) -> None:
        for chunk in client.completions.create(model=model, prompt=_prompt(500, seed), max_tokens=2, stream=True,
                                               temperature=0.0, extra_body={"priority": priority,
                                                                            "ignore_eos": True,
                                                                            "return_token_ids": True}):
            if any((c.model_extra or {}).get("token_ids") for c in chunk.choices) and name not in first_token:
                first_token.append(name)

    running = lambda: srv.get("/workers")[1]["num_running"]  # noqa: E731
    for pid in (prefill, *decodes):
        os.kill(pid, signal.SIGSTOP)
    try:
        with cf.ThreadPoolExecutor(7) as pool:
            futs = [pool.submit(run, f"low{i}", 1, 10 + i) for i in range(6)]
            _wait(lambda: running() == 6, "the low-priority requests never arrived")
            futs.append(pool.submit(run, "high", -5, 99))
            _wait(lambda: running() == 7, "the urgent request never arrived")
            os.kill(prefill, signal.SIGCONT)
            # four prompts hold 128 blocks; the fifth's first pieces take the last 3: frozen
            _wait(lambda: _row(srv, "prefill")["kv_blocks_used"] == 131,
                  lambda: f"the prefill pool did not fill: {srv.workers()}", 90)
            _wait(lambda: len(first_token) >= 4, "four prompts did not stream their first token", 15)
            time.sleep(0.3)
            frozen = list(first_token)
            for pid in decodes:
                os.kill(pid, signal.SIGCONT)
            for f in futs:
                f.result(timeout=120)
    finally:
        _resume(prefill, *decodes)
    assert len(frozen) == 4 and "high" in frozen, frozen
    assert srv.wait_idle()


def test_a_back_pressured_prefill_worker_sleeps_instead_of_spinning(server):
    """Both decode workers are stopped: two prefilled prompts hold the prefill pool until
    their Release, and the third prompt's chunks cannot run. The prefill worker then blocks
    on its socket: under a fifth of a core (it spun at ~1 core)."""
    srv, model = server
    (prefill,) = _pid_of(srv, "prefill")
    decodes = _pid_of(srv, "decode")
    client = srv.openai(timeout=120)
    for pid in decodes:
        os.kill(pid, signal.SIGSTOP)
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(client.completions.create, model=model, prompt=_prompt(1000, 20 + i), max_tokens=3,
                                temperature=0.0, extra_body={"ignore_eos": True}) for i in range(3)]
            # two prompts hold 126 blocks, the third's first pieces the last 5: it cannot go on
            _wait(lambda: _row(srv, "prefill")["kv_blocks_used"] == 131,
                  lambda: f"the prefill pool did not fill: {srv.workers()}", 90)
            assert _row(srv, "prefill")["queued_prefill_tokens"] > 0
            cpu0, t0 = _cpu_s(prefill), time.monotonic()
            time.sleep(2.0)
            share = (_cpu_s(prefill) - cpu0) / (time.monotonic() - t0)
            print(f"\nback-pressured prefill worker: {share:.3f} of a core")
            _resume(*decodes)
            outs = [f.result(timeout=120) for f in futs]
    finally:
        _resume(*decodes)
    assert share < 0.2
    assert [o.choices[0].finish_reason for o in outs] == ["length"] * 3
    assert srv.wait_idle()


def test_a_migrated_seeded_penalised_stream_equals_an_unmigrated_one(server, default_model_dir):
    """SIGKILL the decode worker mid-stream: the request resumes on the other one with its
    output position and outputs, so seeded draws, penalties and min_tokens go on as before."""
    from tetri import LLM, SamplingParams

    srv, model = server
    prompt = [5, 6, 7, 8]
    knobs = dict(temperature=0.9, top_p=0.95, seed=1234, presence_penalty=0.6, frequency_penalty=0.4)
    extra = dict(repetition_penalty=1.2, min_tokens=100, return_token_ids=True)
    client = srv.openai(timeout=120)
    got: list[int] = []
    decodes = _pid_of(srv, "decode")
    frozen = []

    def stream() -> None:
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=130, stream=True,
                                               extra_body=extra, **knobs):
            for ch in chunk.choices:
                got.extend((ch.model_extra or {}).get("token_ids") or [])
            if len(got) >= 30 and not frozen:  # freeze the decode side mid-stream, whatever the load
                for pid in decodes:
                    os.kill(pid, signal.SIGSTOP)
                frozen.append(len(got))

    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(stream)
        try:
            _wait(lambda: frozen or fut.done(), "the stream never reached 30 tokens", 90)
            assert frozen, f"the stream ended before it was frozen: {len(got)} tokens"
            busy = [w for w in srv.workers() if w["role"] == "decode" and w["running"] > 0]
            assert len(busy) == 1, f"one decode worker should hold the stream: {srv.workers()}"
            os.kill(busy[0]["pid"], signal.SIGKILL)
        finally:
            _resume(*decodes)
        fut.result(timeout=120)
        assert frozen[0] < 130, "the kill came after the last token"
    metrics = srv.get("/metrics")[1]
    migrated = [ln for ln in metrics.splitlines() if ln.startswith("tetri:requests_migrated_total")]
    assert migrated and float(migrated[0].split()[-1]) >= 1
    want = LLM(default_model_dir).generate([prompt], SamplingParams(max_tokens=130, repetition_penalty=1.2,
                                                                    min_tokens=100, **knobs))[0]
    assert len(want.token_ids) >= 100
    assert got == want.token_ids
