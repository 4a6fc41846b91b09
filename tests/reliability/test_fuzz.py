"""Fuzzing: the wire decoders (hypothesis), garbage on a live server's ipc:// sockets, and
HTTP bodies generated from the server's own /openapi.json.

(a) `to_worker_decoder` / `from_worker_decoder` on random bytes, random msgpack structures and
    mutated real messages raise only msgspec.DecodeError (ValidationError is a subclass) --
    except for two classes of input found here (KNOWN_NON_DECODE_ERRORS).
(b) random bytes, truncated messages, messages of the other channel and Aborts/Releases for
    unknown requests pushed into a live server's worker inboxes and front.sock: same pids, no
    restart, /health 200, and a normal request still gets the offline engine's tokens.
(c) bodies generated from /openapi.json (plain hypothesis, no schemathesis) and mutated into
    schema violations, posted to /v1/completions and /v1/chat/completions: only 2xx/4xx, never
    a 5xx or an in-band server error, and no worker crash.
The server bugs first found here are fixed and kept as regression tests (`*_hostile_*`, and
`test_accepted_sampling_params_never_crash_the_sampler` at the bottom); the generators of the
live tests produce those inputs too (penalties, min_tokens, tiny temperatures), so a
regression crashes the live server and fails them.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import time
import typing
from types import SimpleNamespace

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.reliability.helpers import SERVED, ipc_dir_of, parse_sse, reference, wait_until
from tetri import protocol as P
from tetri.types import SamplingParams, TokenLogprob

VOCAB = 512  # the embedded default model's

# ---- (a) the decoders ----------------------------------------------------------------------

DECODERS = {"to_worker": P.to_worker_decoder, "from_worker": P.from_worker_decoder}
TO_WORKER = typing.get_args(P.ToWorker)
FROM_WORKER = typing.get_args(P.FromWorker)


# What msgspec 0.22 raises on hostile input besides DecodeError: UnicodeDecodeError for a str
# (tag or field) that is not UTF-8, RecursionError for arrays nested ~1000 deep in an Any-typed
# field. The server catches only DecodeError, so each of these kills a worker or the front's
# receive loop; every reader now goes through `protocol.decode_or_none`. The properties tolerate
# exactly these two so that they keep guarding against any other exception type.
KNOWN_NON_DECODE_ERRORS = (UnicodeDecodeError, RecursionError)


def _decode_everywhere(raw: bytes) -> None:
    """Decode with both channel decoders; anything but msgspec.DecodeError (or the two known
    bugs above) propagates."""
    for dec in DECODERS.values():
        try:
            dec.decode(raw)
        except (msgspec.DecodeError, *KNOWN_NON_DECODE_ERRORS):  # ValidationError is a DecodeError
            pass


def hostile(raw: bytes) -> bool:
    """Whether a decoder raises something else than DecodeError on `raw` (see above)."""
    for dec in DECODERS.values():
        try:
            dec.decode(raw)
        except msgspec.DecodeError:
            pass
        except Exception:  # noqa: BLE001
            return True
    return False


def _pool(**kw) -> P.PoolInfo:
    return P.PoolInfo(num_blocks=8, num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32", **kw)


def valid_messages() -> list[msgspec.Struct]:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    lp = TokenLogprob(7, -0.5, [(7, -0.5), (8, -1.5)])
    return [
        P.ChunkPlan(chunk_id=1, pieces=[P.PlanPiece(req_id="a", start=0, num_tokens=3, is_last=True,
                                                    new=P.NewReq(prompt_token_ids=[5, 6, 7], params=params))]),
        P.Handoff(req_id="a", src_worker=0, block_ids=[0, 1], prompt_token_ids=[5, 6, 7], params=params,
                  first_tokens=[9], open_choices=[0]),
        P.Release(req_id="a"), P.Abort(req_id="a", choice=0), P.Abort(req_id="b"),
        P.SubmitMixed(req_id="a", prompt_token_ids=[1, 2], params=params), P.SetRole(role="decode"), P.Shutdown(),
        P.PeerPools(pools={0: _pool(shm_name="tetri-kv-x"), 1: _pool(cuda_ipc=b"\x01handle")}),
        P.Ready(worker_id=0, pid=1, role="prefill", device="cpu", pool=_pool(), max_model_len=64, eos_token_ids=[1]),
        P.ChunkDone(worker_id=0, chunk_id=1, finished=[P.PrefillResult(req_id="a", block_ids=[0], num_prompt_tokens=3,
                                                                     first_tokens=[4], logprobs=[lp],
                                                                     finish_reasons=[None], hidden=[0.5])],
                    failed=["b"]),
        P.KVCopied(worker_id=1, req_id="a", num_bytes=10, seconds=0.1), P.Dropped(worker_id=1, req_id="a"),
        P.TokenBatch(worker_id=1, req_ids=["a"], choices=[0], token_ids=[5], finish_reasons=["length"], logprobs=[lp]),
        P.WorkerError(worker_id=1, message="boom", req_id="a"),
    ]


MSGPACK_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                   | st.text(max_size=12) | st.binary(max_size=12))
MSGPACK_VALUES = st.recursive(
    MSGPACK_SCALARS,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=5),
    max_leaves=25,
)
TAGS = [c.__name__ for c in TO_WORKER + FROM_WORKER] + ["", "Nope", "ready"]
FIELDS = sorted({f for c in TO_WORKER + FROM_WORKER for f in c.__struct_fields__}
                | {f for c in (P.PoolInfo, P.NewReq, P.PlanPiece, P.PrefillResult, SamplingParams)
                   for f in c.__struct_fields__})


@st.composite
def tagged_dicts(draw):
    """Maps that pass the tag lookup (mostly) and then hit field validation."""
    body = {"type": draw(st.sampled_from(TAGS) | MSGPACK_SCALARS)}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        body[name] = draw(MSGPACK_VALUES)
    return body


@st.composite
def mutated_messages(draw):
    """A real message with one field replaced, dropped, or the bytes cut or flipped."""
    msg = draw(st.sampled_from(valid_messages()))
    body = msgspec.to_builtins(msg)
    how = draw(st.sampled_from(["replace", "drop", "cut", "flip"]))
    if how in ("replace", "drop") and len(body) > 1:
        key = draw(st.sampled_from(sorted(k for k in body if k != "type")))
        if how == "drop":
            del body[key]
        else:
            body[key] = draw(MSGPACK_VALUES)
        return msgspec.msgpack.encode(body)
    raw = bytearray(msgspec.msgpack.encode(msg))
    if how == "cut":
        return bytes(raw[: draw(st.integers(0, max(0, len(raw) - 1)))])
    i = draw(st.integers(0, len(raw) - 1))
    raw[i] = draw(st.integers(0, 255))
    return bytes(raw)


FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_valid_messages_round_trip_on_their_channel():
    for msg in valid_messages():
        dec = P.to_worker_decoder if isinstance(msg, TO_WORKER) else P.from_worker_decoder
        assert dec.decode(P.encode(msg)) == msg
        other = P.from_worker_decoder if dec is P.to_worker_decoder else P.to_worker_decoder
        with pytest.raises(msgspec.ValidationError):  # the other channel's decoder refuses it
            other.decode(P.encode(msg))


@FAST
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_decode_errors(raw):
    _decode_everywhere(raw)


@FAST
@given(MSGPACK_VALUES)
def test_random_msgpack_structures_raise_only_decode_errors(value):
    _decode_everywhere(msgspec.msgpack.encode(value))


@FAST
@given(tagged_dicts())
def test_tagged_maps_with_random_fields_raise_only_decode_errors(body):
    _decode_everywhere(msgspec.msgpack.encode(body))


@FAST
@given(mutated_messages())
def test_mutated_real_messages_raise_only_decode_errors(raw):
    _decode_everywhere(raw)


def deeply_nested(channel: str, depth: int = 5000) -> bytes:
    """A ~5 KB message whose Any-typed field (PoolInfo.cuda_ipc: list) nests `depth` arrays."""
    enc = msgspec.msgpack.encode
    pool = dict(num_blocks=1, num_layers=1, block_size=1, num_kv_heads=1, head_dim=1, dtype="x", cuda_ipc="@@")
    if channel == "to_worker":
        body = {"type": "PeerPools", "pools": {0: pool}}
    else:
        body = {"type": "Ready", "worker_id": 0, "pid": 1, "role": "decode", "device": "cpu", "pool": pool,
                "max_model_len": 8, "eos_token_ids": []}
    return enc(body).replace(enc("@@"), b"\x91" * depth + b"\xc0")


def invalid_utf8(channel: str) -> bytes:
    """A 20-byte message whose req_id string is not UTF-8 (one flipped bit would do)."""
    msg = P.Abort(req_id="abc") if channel == "to_worker" else P.Dropped(worker_id=1, req_id="abc")
    return P.encode(msg).replace(b"abc", b"\xffbc")


HOSTILE = {"invalid_utf8": invalid_utf8, "deep_nesting": deeply_nested}

@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("channel", sorted(DECODERS))
def test_hostile_message_decodes_to_none(channel, kind):
    """msgspec itself raises UnicodeDecodeError / RecursionError on these; `decode_or_none`,
    which every socket reader uses, turns every malformed message into None."""
    assert P.decode_or_none(DECODERS[channel], HOSTILE[kind](channel)) is None


@pytest.fixture(scope="module")
def decode_node(default_model_dir):
    """A real decode-role `WorkerNode` (real model, a tiny pool), no sockets."""
    from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
    from tetri.workers.executor import Executor
    from tetri.workers.node import WorkerNode

    ex = Executor(ModelConfig(model=default_model_dir), CacheConfig(num_blocks=4))
    yield WorkerNode(0, "decode", ex, EngineSchedConfig())
    ex.close()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_worker_shell_drops_a_hostile_message(kind, decode_node, caplog):
    """The shell's receive path: a hostile frame is logged and dropped (nothing reaches the
    node, nothing is sent, no exception); the next, valid frame still reaches the node, whose
    answer goes out."""
    from tetri.workers.proc import WorkerShell

    shell = WorkerShell.__new__(WorkerShell)  # no sockets: only handle() runs, on a real node
    shell.args = SimpleNamespace(worker_id=0)
    shell.node = decode_node
    sent = []
    shell.send = sent.append
    with caplog.at_level("WARNING", logger="tetri.worker"):
        shell.handle(HOSTILE[kind]("to_worker"))
    assert sent == []
    assert any("malformed" in r.getMessage() for r in caplog.records), caplog.text
    shell.handle(P.encode(P.Abort(req_id="x")))  # a decode worker answers an Abort with Dropped
    assert sent == [P.Dropped(worker_id=0, req_id="x")]


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_front_recv_loop_survives_a_hostile_message(kind):
    from tetri.server.engine_client import RuntimeClient

    class FakePull:  # the receive loop waits on poll(); _drain_pending reads with recv(NOBLOCK)
        def __init__(self, frames):
            self.frames = list(frames)

        async def poll(self):
            if not self.frames:
                await asyncio.sleep(3600)
            return zmq.POLLIN

        def recv(self, flags=0):
            if not self.frames:
                raise zmq.Again()
            return self.frames.pop(0)

    client = RuntimeClient.__new__(RuntimeClient)  # no workers: only the receive loop runs
    handled = []
    client.pull = client._pull_now = FakePull([HOSTILE[kind]("from_worker"),
                                               P.encode(P.Dropped(worker_id=1, req_id="x"))])
    client._on_message = handled.append
    task = asyncio.create_task(client._recv_loop())
    await asyncio.sleep(0.2)
    alive = not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert alive, "the receive loop died"
    assert handled[-1:] == [P.Dropped(worker_id=1, req_id="x")]


# ---- (b) garbage on a live server's sockets ------------------------------------------------------


def _garbage(rng: random.Random, channel: str) -> list[bytes]:
    own = [m for m in valid_messages() if isinstance(m, TO_WORKER if channel == "to_worker" else FROM_WORKER)]
    other = [m for m in valid_messages() if not isinstance(m, TO_WORKER if channel == "to_worker" else FROM_WORKER)]
    out = [b"", b"\x00", b"\xc1", b"\xff" * 64, b"\x91" * 8, msgspec.msgpack.encode({"type": "Nope"}),
           msgspec.msgpack.encode({"type": 5}), msgspec.msgpack.encode([1, 2, 3]), b"{}", b"\x81\xa4type"]
    out += [rng.randbytes(rng.choice([1, 3, 16, 100, 1000, 4096])) for _ in range(60)]
    for msg in own:  # truncated real messages (a cut map is never a valid message)
        raw = P.encode(msg)
        out += [raw[:k] for k in sorted({1, len(raw) // 3, len(raw) // 2, len(raw) - 1}) if 0 < k < len(raw)]
        if isinstance(msg, (P.Abort, P.Release, P.Dropped, P.TokenBatch)):
            # bit flips only where a flip that still decodes is harmless (the channel is trusted:
            # a flipped SetRole/Shutdown/Ready could be a valid order)
            flipped = bytearray(raw)
            flipped[rng.randrange(len(raw))] ^= 0xFF
            out.append(bytes(flipped))
    out += [P.encode(m) for m in other]  # valid messages of the other channel
    return out + [HOSTILE[k]("to_worker" if channel == "to_worker" else "from_worker") for k in sorted(HOSTILE)]


def test_garbage_on_worker_and_front_sockets_is_dropped(shared_server, offline):
    import zmq

    srv = shared_server
    before = {w["worker_id"]: w for w in srv.workers()}
    log_from = os.path.getsize(srv.log.name)
    ipc = ipc_dir_of(before[0]["pid"])
    assert ipc and os.path.exists(os.path.join(ipc, "front.sock")), ipc
    rng = random.Random(1234)
    ctx = zmq.Context()
    sent = 0
    try:
        for wid, row in before.items():
            frames = _garbage(rng, "to_worker")
            frames += [P.encode(P.Abort(req_id=f"unknown-{wid}")), P.encode(P.Abort(req_id="unknown", choice=3))]
            if row["role"] == "prefill":
                frames.append(P.encode(P.Release(req_id="unknown")))
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 5000)
            sock.connect(f"ipc://{ipc}/w{wid}.sock")
            for f in frames:
                sock.send(f)
            sent += len(frames)
            sock.close()
        frames = _garbage(rng, "from_worker")
        frames += [P.encode(P.Dropped(worker_id=1, req_id="unknown")),
                   P.encode(P.TokenBatch(worker_id=1, req_ids=["unknown"], choices=[0], token_ids=[5],
                                         finish_reasons=[None]))]
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(f"ipc://{ipc}/front.sock")
        for f in frames:
            sock.send(f)
        sent += len(frames)
        sock.close()
    finally:
        ctx.term()  # waits (LINGER) until every frame was handed over
    assert sent > 200
    time.sleep(1.0)  # the supervisor notices a dead worker within 0.1 s
    after = {w["worker_id"]: w for w in srv.workers()}
    assert {w: (r["pid"], r["restarts"], r["state"]) for w, r in after.items()} == \
           {w: (r["pid"], 0, "ready") for w, r in before.items()}
    assert srv.get("/health")[0] == 200
    prompt = [11, 12, 13, 14, 15]
    out = srv.openai(timeout=60).completions.create(model=SERVED, prompt=prompt, max_tokens=10, temperature=0.0,
                                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == reference(offline, [prompt], 10)[0]
    assert srv.wait_idle(10)
    with open(srv.log.name) as f:
        f.seek(log_from)
        new_log = f.read()
    assert "Traceback" not in new_log and "exited" not in new_log, new_log[-3000:]
    assert "malformed" in new_log  # the drops were logged


# ---- (c) HTTP bodies from /openapi.json -----------------------------------------------------------

MAX_ITEMS, MAX_CHARS = 4, 24


def schema_strategy(schema: dict, defs: dict, overrides: dict | None = None) -> st.SearchStrategy:
    """A hypothesis strategy for the JSON values a (msgspec-generated) JSON Schema accepts;
    arrays and strings are kept short. `overrides`: property name -> strategy."""
    if "$ref" in schema:
        return st.deferred(lambda: schema_strategy(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, overrides))
    if "anyOf" in schema:
        return st.one_of([schema_strategy(s, defs, overrides) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if "exclusiveMinimum" in schema:
            lo = schema["exclusiveMinimum"] + 1
        if "exclusiveMaximum" in schema:
            hi = schema["exclusiveMaximum"] - 1
        return st.integers(lo, hi)
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        return st.floats(lo, hi, exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
                         allow_nan=False, allow_infinity=False)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", MAX_CHARS), MAX_CHARS))
    if kind == "array":
        lo = schema.get("minItems", 0)
        return st.lists(schema_strategy(schema.get("items", {}), defs, overrides), min_size=lo,
                        max_size=max(lo, min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS)))
    if kind == "object":
        props = schema.get("properties", {})
        req = set(schema.get("required", []))
        over = overrides or {}
        strat = {k: over[k] if k in over else schema_strategy(v, defs, overrides) for k, v in props.items()}
        return st.fixed_dictionaries({k: s for k, s in strat.items() if k in req},
                                     optional={k: s for k, s in strat.items() if k not in req})
    return st.nothing()


# Keep generated work tiny (a valid request must not ask for thousands of tokens) while still
# reaching the out-of-range branches of every bounded field.
OVERRIDES = {
    "model": st.sampled_from([SERVED, SERVED, SERVED, None]) | st.text(max_size=8),
    "max_tokens": st.integers(1, 4) | st.integers(5000, 2**63 - 1) | st.none(),
    "max_completion_tokens": st.integers(1, 4) | st.integers(5000, 2**63 - 1) | st.none(),
    "n": st.integers(1, 2) | st.integers(17, 2**31 - 1) | st.none(),
    "min_tokens": st.integers(0, 4) | st.integers(5, 2**63 - 1) | st.none(),
}


def _rarely(value) -> st.SearchStrategy:
    """Absent (None) nine times in ten, else `value`."""
    return st.integers(0, 9).map(lambda i: value if i == 0 else None)


# Fields that are a 400 for almost any value (features not built yet, values past a limit):
# drawn rarely, so valid bodies stay common while their 400s are still generated.
OVERRIDES.update({
    "tools": _rarely([{"type": "function"}]), "tool_choice": _rarely("auto"), "parallel_tool_calls": _rarely(True),
    "functions": _rarely([{}]), "function_call": _rarely("auto"), "response_format": _rarely({"type": "json_object"}),
    "structured_outputs": _rarely({}), "guided_json": _rarely({}), "guided_regex": _rarely("a"),
    "guided_choice": _rarely(["a"]), "guided_grammar": _rarely("a"), "guided_decoding_backend": _rarely("x"),
    "guided_whitespace_pattern": _rarely(" "), "best_of": _rarely(3), "suffix": _rarely("x"),
    "stream_options": _rarely({"include_usage": True}), "truncate_prompt_tokens": _rarely(2**20),
    "prompt_logprobs": _rarely(21) | st.integers(0, 2), "logit_bias": _rarely({"x": 1}) | st.just({"5": 1.0}),
    "tool_calls": _rarely([{}]), "echo": st.booleans() | st.none(), "continue_final_message": _rarely(True),
    "content": st.text(max_size=MAX_CHARS) | _rarely(None),
})
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                           | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


@st.composite
def http_cases(draw, doc):
    defs = doc["components"]["schemas"]
    path, name = draw(st.sampled_from([("/v1/completions", "CompletionRequest"),
                                       ("/v1/chat/completions", "ChatCompletionRequest")]))
    body = draw(schema_strategy(defs[name], defs, OVERRIDES))
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = draw(st.integers(1, 4))
    for msg in body.get("messages") or ():  # content is optional (an assistant's tool calls need none): mostly there
        if isinstance(msg, dict) and "content" not in msg:
            msg["content"] = draw(OVERRIDES["content"])
    mutate = draw(st.integers(0, 9))
    if mutate == 0:  # a schema violation: a field of the wrong type or shape
        key = draw(st.sampled_from(sorted(defs[name]["properties"])))
        body[key] = draw(JSON_VALUES)
    elif mutate == 1 and name == "ChatCompletionRequest":
        body.pop("messages")
    elif mutate == 2:
        body = draw(JSON_VALUES)
    return path, mutate, body


def _post(port: int, path: str, body) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body, allow_nan=False), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_openapi_generated_bodies_never_get_a_5xx(shared_server):
    srv = shared_server
    status, doc = srv.get("/openapi.json")
    assert status == 200 and "CompletionRequest" in doc["components"]["schemas"]
    before = {w["worker_id"]: (w["pid"], w["restarts"]) for w in srv.workers()}
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(http_cases(doc))
    def post_one(case):
        path, mutate, body = case
        status, headers, raw = _post(srv.port, path, body)
        seen[status] = seen.get(status, 0) + 1
        assert status in (200, 400, 404), (path, body, status, raw[:300])
        if not isinstance(body, dict) or (mutate == 1 and path.endswith("/chat/completions")):
            assert status == 400, (path, body, status, raw[:300])  # not a request object / no messages
        if status != 200:
            err = json.loads(raw)["error"]
            assert err["message"] and err["type"], raw
        elif headers.get("Content-Type", "").startswith("text/event-stream"):
            events = parse_sse(raw)
            assert events and events[-1] == "[DONE]", (path, body, raw[-300:])
            errors = [e for e in events if isinstance(e, dict) and "error" in e]
            assert not errors, (path, body, errors)
        else:
            assert json.loads(raw)["choices"], (path, body, raw[:300])

    post_one()
    print("statuses:", dict(sorted(seen.items())))
    assert seen.get(200, 0) >= 20 and sum(n for s, n in seen.items() if 400 <= s < 500) >= 20, seen
    after = {w["worker_id"]: (w["pid"], w["restarts"]) for w in srv.workers()}
    assert after == before
    assert srv.get("/health")[0] == 200
    assert wait_until(lambda: srv.wait_idle(2), 10)


# ---- bugs: requests the HTTP layer accepts that crash the sampler (and so the worker) ----------

def _crasher(case_id: str, extra: dict, why: str, raises=RuntimeError):
    # Once a crasher (fixed now); kept as a regression case.
    return pytest.param(extra, id=case_id)


INPLACE = ("tetri/workers/sampler.py Sampler.sample: `logits = logits.float()` is a no-op on the float32 logits, "
           "which ModelRunner.run made under @torch.inference_mode(); Executor.run samples outside inference mode, "
           "so the in-place writes in _process_row (`logits[i, banned] = -inf`) and _apply_penalties "
           "(`row_logits[seen] = ...`, `row_logits -= ...`) raise 'RuntimeError: Inplace update to inference tensor "
           "outside InferenceMode'")
SAMPLING_CASES = [
    pytest.param({"temperature": 0.0}, id="greedy"),
    pytest.param({"temperature": 0.8, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "seed": 3, "logprobs": 2}, id="sampled"),
    pytest.param({"temperature": 0.0, "min_tokens": 2, "ignore_eos": True}, id="min_tokens_ignore_eos"),
    _crasher("presence_penalty", {"presence_penalty": 0.5}, INPLACE + " (decode worker, from the 2nd token)"),
    _crasher("frequency_penalty", {"temperature": 0.0, "frequency_penalty": -0.5}, INPLACE),
    _crasher("repetition_penalty", {"temperature": 0.0, "repetition_penalty": 1.2}, INPLACE + " (prefill worker)"),
    _crasher("min_tokens", {"temperature": 0.0, "min_tokens": 2}, INPLACE + " (prefill worker)"),
    _crasher("oov_stop_token_ids_with_min_tokens",
             {"temperature": 0.0, "min_tokens": 1, "ignore_eos": True, "stop_token_ids": [100000]},
             "tetri/server/openai_schemas.py accepts any stop_token_ids in [0, 2**31) and nothing checks them against "
             "the vocabulary; with min_tokens > 0 Sampler._process_row indexes the logits with them -> IndexError",
             raises=IndexError),
    _crasher("tiny_repetition_penalty", {"temperature": 1.0, "repetition_penalty": 1e-300},
             INPLACE + "; and once that is fixed: repetition_penalty only has to be > 0, _apply_penalties divides "
             "the float32 logits by it -> inf -> nan probabilities -> torch.multinomial RuntimeError"),
    _crasher("tiny_temperature", {"temperature": 1e-300},
             "temperature only has to be >= 0; Sampler._draw divides the float32 logits by it: below ~1e-38 they "
             "become inf/nan and torch.multinomial raises RuntimeError"),
]


@pytest.mark.parametrize("extra", SAMPLING_CASES)
async def test_accepted_sampling_params_never_crash_the_sampler(extra, default_model_dir):
    """Contract: /v1/completions accepts each of these (200), and the workers' Sampler can
    sample with what it passed on (on logits made under inference mode, as ModelRunner.run
    makes them; the first token as the prefill worker samples it, the next as a decode worker
    does)."""
    import aiohttp
    import torch

    from tetri.config import ServerConfig
    from tetri.server.app import create_app, start_app
    from tetri.server.fake_engine import FakeEngineClient
    from tetri.server.metrics import Metrics
    from tetri.workers.sampler import SampleRow, Sampler

    engine = FakeEngineClient(default_model_dir, max_model_len=256)
    runner, port = await start_app(create_app(ServerConfig(port=0), engine, Metrics()))
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": SERVED, "prompt": [5, 6, 7], "max_tokens": 3, **extra}
            async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                status = r.status
                await r.read()
    finally:
        await runner.cleanup()
    assert status == 200  # every case is a request the API accepts (none of them is refused)
    params = engine.submitted[-1].params
    sampler = Sampler((1, 3))
    out: list[int] = []
    for step in range(2):
        with torch.inference_mode():
            logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(step)) * 4
        tokens, _ = sampler.sample(logits, [SampleRow(params, list(out), [5, 6, 7])])
        out += tokens
    assert all(0 <= t < VOCAB for t in out)
