"""`tetri-serve` as a real subprocess (disaggregated and colocated), driven over HTTP with the
official openai SDK: greedy output must equal the offline engine's on the same model."""

import concurrent.futures as cf
import random

import pytest

from tests.runtime.server_proc import ServerProc
from tetri import LLM, SamplingParams

CHUNK = 32
LENGTHS = [3, 9, 31, 32, 33, 70, 100, 5]


def prompts():
    rng = random.Random(7)
    return [[rng.randrange(4, 500) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def offline(default_model_dir):
    llm = LLM(default_model_dir, chunk_size=CHUNK)
    yield llm
    llm.close()


def expected(offline, max_tokens=12):
    outs = offline.generate(prompts(), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outs]


def complete(server, prompt, max_tokens=12, **extra):
    client = server.openai()
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
    return out


def stream_tokens(server, prompt, max_tokens=12):
    client = server.openai()
    ids = []
    for chunk in client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True, "return_token_ids": True}):
        for ch in chunk.choices:
            ids.extend(getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids") or [])
    return ids


def token_ids(out):
    ch = out.choices[0]
    return getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids")


TETRI_POLICIES = ["--prefill-policy", "sjf", "--dispatch-policy", "tetri", "--decode-policy", "reserve-dynamic",
                  "--flip", "--prefill", "1", "--decode", "2"]


@pytest.fixture(scope="module", params=["disagg", "colocated", "tetri-policies"])
def server(request, default_model_dir):
    args = ["--device", "cpu", "--chunk-size", str(CHUNK)]
    if request.param == "tetri-policies":  # TetriInfer's policies with a learned probe predictor
        model_dir, _ = request.getfixturevalue("probe_dir")
        args += [*TETRI_POLICIES, "--predictor", f"model:{model_dir}"]
    else:
        args += ["--workers", "2", "--mode", request.param]
    srv = ServerProc(*args)
    srv.start()
    srv.model = srv.openai().models.list().data[0].id
    srv.mode = request.param
    yield srv
    srv.stop()


def test_greedy_matches_offline_engine_concurrently(server, offline):
    want = expected(offline)
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: complete(server, p), prompts()))
    assert [token_ids(o) for o in outs] == want
    assert all(o.choices[0].finish_reason == "length" for o in outs)


def test_streaming_matches_offline_engine(server, offline):
    want = expected(offline)
    for p, w in list(zip(prompts(), want))[:3]:
        assert stream_tokens(server, p) == w


def test_chat_matches_offline_chat(server, offline):
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    want = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)).token_ids
    out = server.openai().chat.completions.create(model=server.model, messages=messages, max_tokens=10,
                                                  temperature=0.0, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert token_ids(out) == want


def test_n2_and_seeded_sampling(server):
    out = complete(server, prompts()[2], max_tokens=8, n=2)
    assert len(out.choices) == 2
    client = server.openai()
    a = client.completions.create(model=server.model, prompt=prompts()[1], max_tokens=10, temperature=1.0, seed=11)
    b = client.completions.create(model=server.model, prompt=prompts()[1], max_tokens=10, temperature=1.0, seed=11)
    assert a.choices[0].text == b.choices[0].text


def test_idle_server_holds_no_blocks(server):
    complete(server, prompts()[0])
    assert server.wait_idle(), server.workers()


def test_include_usage_counts_the_streamed_tokens(server):
    client = server.openai()
    stream = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=9, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
    streamed, usage = [], None
    for chunk in stream:
        for ch in chunk.choices:
            streamed.extend((ch.model_extra or {}).get("token_ids") or [])
        usage = chunk.usage or usage
    assert len(streamed) == 9 and usage.completion_tokens == 9
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + 9


def test_stop_string_ends_the_choice_and_is_not_returned(server):
    client = server.openai()
    full = client.completions.create(model=server.model, prompt=prompts()[4], max_tokens=16, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[5:8]
    assert stop
    cut = client.completions.create(model=server.model, prompt=prompts()[4], max_tokens=16, temperature=0.0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert server.wait_idle()


def test_clients_disconnecting_mid_stream_leave_nothing_running(server):
    import http.client
    import json as _json

    rng = random.Random(5)
    for i in range(6):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"model": server.model, "prompt": prompts()[i % len(LENGTHS)], "max_tokens": 400, "stream": True,
                "temperature": 0.0, "ignore_eos": True}
        conn.request("POST", "/v1/completions", _json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for _ in range(rng.randrange(0, 6)):  # read a few events, sometimes none
            resp.readline()
        conn.close()  # the client goes away mid-stream
    assert server.wait_idle(timeout_s=20), server.workers()


def _handoff_counters(server) -> tuple[int, int]:
    row = next(w for w in server.workers() if w["role"] == "decode")
    return row["handoff_blocks_copied"], row["handoff_blocks_cached"]


def test_a_conversation_copies_only_the_blocks_the_decode_worker_lacks(server, default_model_dir):
    """Each turn resends the history (the previous prompt and its answer): the decode worker
    attaches what it kept cached of the last turn and copies only the rest from the prefill
    worker, with the same tokens as an engine with caching off."""
    if server.mode != "disagg":
        pytest.skip("needs one prefill and one decode worker")
    import re
    import urllib.request

    reference = LLM(default_model_dir, chunk_size=CHUNK, enable_prefix_caching=False)
    rng = random.Random(21)
    history, before = [rng.randrange(4, 500) for _ in range(70)], _handoff_counters(server)
    for turn in range(3):
        out = token_ids(complete(server, history))
        want = reference.generate([history], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        assert out == want[0].token_ids
        assert server.wait_idle(), server.workers()
        copied, cached = (now - then for now, then in zip(_handoff_counters(server), before))
        # turn t >= 1 finds the last turn's prompt and all its answer but the last token cached
        kept = 0 if turn == 0 else (len(history) - 20 - 1) // 16
        assert (copied, cached) == (-(-len(history) // 16) - kept, kept)
        history, before = history + out + [rng.randrange(4, 500) for _ in range(20)], _handoff_counters(server)
    reference.close()
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    row = next(w for w in server.workers() if w["role"] == "decode")
    for name in ("copied", "cached"):
        found = re.search(rf'^tetri:handoff_blocks_{name}_total{{role="decode",worker="{row["worker_id"]}"}} (\S+)$',
                          text, re.M)
        assert found and float(found.group(1)) == row[f"handoff_blocks_{name}"]
