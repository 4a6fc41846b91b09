"""A grammar's state across processes' boundaries, on the real model and pools in one process
(tests/runtime/inproc.py): the prefill worker samples the first token under the mask, the decode
worker rebuilds the matcher from the spec and that token and continues it, and a migration after
the decode worker's death resumes the grammar where the client's stream stopped. Each output is
checked against its grammar and against the same request served whole by one mixed worker."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import tests.runtime.inproc as inproc
from tests.runtime.inproc import Cluster
from tetri.protocol import SetRole
from tetri.sched.front import FrontReq
from tetri.server.tokenizer import load_tokenizer
from tetri.types import SamplingParams, StructuredOutputsParams as Spec

ITEMS = {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": 6, "maxItems": 6}
REGEX = r"\[([0-9]{2}, ){4}[0-9]{2}\]"
PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module", autouse=True)
def one_model_load():
    """Every cluster of the module shares one loaded model (each Cluster's nodes already do)."""
    loaded = {}
    real = inproc.load_model

    def load_once(model_dir):
        if model_dir not in loaded:
            loaded[model_dir] = real(model_dir)
        return loaded[model_dir]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inproc, "load_model", load_once)
        yield


def _params(spec: Spec, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=120, temperature=0.0, n=n, structured_outputs=spec)


def _submit(c: Cluster, req_id: str, params: SamplingParams, prompt=PROMPT) -> None:
    c.apply(c.front.add(FrontReq(req_id, list(prompt), params, c.now), c.loads(), c.now))


def _reference(model_dir, params: SamplingParams) -> list[int]:
    c = Cluster(model_dir, roles=("mixed",))
    _submit(c, "ref", params)
    c.run()
    return c.tokens["ref"]


@pytest.mark.parametrize("spec,check", [
    (Spec(regex=REGEX), lambda text: re.fullmatch(REGEX, text)),
    (Spec(json=json.dumps(ITEMS), any_whitespace=False), lambda text: jsonschema.validate(json.loads(text), ITEMS) or True),
], ids=["regex", "json_schema"])
def test_the_decode_worker_continues_the_grammar_the_prefill_worker_started(default_model_dir, spec, check):
    tok = load_tokenizer(default_model_dir)
    c = Cluster(default_model_dir)
    _submit(c, "a", _params(spec))
    c.run()
    tokens = c.tokens["a"]
    assert c.finished["a"] == "stop" and check(tok.decode(tokens)), tok.decode(tokens)
    prefill, decode = c.nodes[0].ex.grammar.cache, c.nodes[1].ex.grammar.cache
    assert prefill.misses == 1 and decode.misses == 1  # each worker compiled the spec it was sent
    assert tokens == _reference(default_model_dir, _params(spec))


def test_each_choice_keeps_its_own_grammar_across_the_handoff(default_model_dir):
    tok = load_tokenizer(default_model_dir)
    c = Cluster(default_model_dir)
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=4, n=3, structured_outputs=Spec(regex=REGEX))
    _submit(c, "a", params)
    outs = {i: [] for i in range(3)}
    while True:  # route by hand to keep every choice's tokens apart
        for wid in c.nodes:
            c.deliver(wid)
        msgs = list(c.to_front)
        c.pump_front()
        for m in msgs:
            for res in getattr(m, "finished", ()):
                for i, t in enumerate(res.first_tokens):
                    outs[i].append(t)
            for r, ch, t in zip(getattr(m, "req_ids", ()), getattr(m, "choices", ()), getattr(m, "token_ids", ())):
                outs[ch].append(t)
        busy = [w for w, n in c.nodes.items() if n.has_work()]
        if not busy and not c.to_front and not any(c.to_workers.values()):
            break
        for wid in busy:
            c.step(wid)
    texts = [tok.decode(ids) for ids in outs.values()]
    assert all(re.fullmatch(REGEX, t) for t in texts), texts
    assert len(set(texts)) > 1  # three sampled choices, three matchers


def _run_until(c: Cluster, done) -> None:
    for _ in range(500):
        for wid in c.nodes:
            if wid not in c.dead:
                c.deliver(wid)
        c.pump_front()
        if done():
            return
        for wid in [w for w, n in c.nodes.items() if w not in c.dead and n.has_work()]:
            c.step(wid)
    raise AssertionError("never got there")


def test_a_migrated_request_resumes_its_grammar_on_another_decode_worker(default_model_dir):
    tok = load_tokenizer(default_model_dir)
    spec = Spec(json=json.dumps(ITEMS), any_whitespace=False)
    c = Cluster(default_model_dir, roles=("prefill", "decode", "decode"))
    _submit(c, "a", _params(spec))
    _run_until(c, lambda: len(c.tokens["a"]) >= 10)
    victim = c.front.reqs["a"].decode_worker
    emitted = list(c.tokens["a"])
    assert c.front.reqs["a"].output_ids == emitted  # the cluster records what it streams, as the engine client does
    c.dead.add(victim)
    c.apply(c.front.on_worker_dead(victim, c.loads(), migrate=True))
    cont = c.front.reqs["a"]
    assert cont.params.structured_outputs.prefix_token_ids == tuple(emitted)
    assert cont.prompt_token_ids == PROMPT and cont.output_ids == emitted  # re-prefilled as prompt + outputs
    c.run()
    survivor = next(w for w in (1, 2) if w != victim)
    assert c.nodes[survivor].ex.grammar.cache.misses == 1  # the survivor rebuilt the matcher from spec + prefix
    text = tok.decode(c.tokens["a"])
    assert c.finished["a"] == "stop"
    jsonschema.validate(json.loads(text), ITEMS)
    assert c.tokens["a"] == _reference(default_model_dir, _params(spec))  # nothing lost, nothing repeated


def test_a_flipped_worker_serves_the_grammar_in_its_new_role(default_model_dir):
    """An instance flip moves no sequence (the worker is drained first); the flipped worker
    compiles from the spec like any other, from the cache it already holds."""
    tok = load_tokenizer(default_model_dir)
    spec = Spec(regex=REGEX)
    c = Cluster(default_model_dir, roles=("prefill", "decode", "decode"))
    _submit(c, "a", _params(spec))
    c.run()
    decoder = next(w for w in (1, 2) if c.nodes[w].ex.grammar.cache.misses == 1)
    c.nodes[decoder].handle(SetRole(role="prefill"), c.now)
    assert c.nodes[decoder].role == "prefill"
    c.dead.add(0)  # the old prefill worker is gone: the flipped one prefills now
    _submit(c, "b", _params(spec))
    c.run()
    assert re.fullmatch(REGEX, tok.decode(c.tokens["b"])) and c.tokens["b"] == c.tokens["a"]
    cache = c.nodes[decoder].ex.grammar.cache
    assert cache.misses == 1 and cache.hits >= 1  # compiled once as a decode worker, reused as prefill
