"""Grammar-constrained decoding in the workers (tetri/workers/grammar.py) on the embedded model:
the mask leaves exactly the tokens the grammar accepts, constrained outputs follow their
grammars (sampled, several choices), an allow-everything grammar leaves greedy output as it
was, and strict mode is JSON Schema without extra properties."""

from __future__ import annotations

import codecs
import json
import re

import jsonschema
import pytest
import torch

from tetri import LLM, SamplingParams
from tetri.types import StructuredOutputsParams as Spec
from tetri.workers.grammar import GrammarError, GrammarRuntime, compile_spec
from tetri.workers.seq import Seq

ALLOW_ALL = r"root ::= [\x00-\U0010FFFF]*"
"""Any text at all (every token but the UTF-8 continuation bytes that cannot start a character)."""
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(default_model_dir):
    engine = LLM(default_model_dir, device="cpu", chunk_size=64, num_blocks=256, check_invariants=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def runtime(llm):
    ex = llm.executor
    return GrammarRuntime(ex.loaded.model_dir, ex.loaded.spec.vocab_size, ex.eos_token_ids)


def _allowed(matcher, vocab: int) -> set[int]:
    return {t for t in range(vocab) if matcher.fork().accept_token(t)}


def test_the_mask_leaves_exactly_the_tokens_the_grammar_accepts(runtime):
    vocab = runtime.vocab_size
    constrained = Seq("a", 0, [5, 6], SamplingParams(structured_outputs=Spec(json=json.dumps(PERSON))))
    free = Seq("b", 0, [5, 6], SamplingParams())
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        logits = torch.randn(2, vocab, generator=gen)
        before = logits.clone()
        assert runtime.mask(logits, [free, constrained]) == [1]
        finite = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
        assert finite == _allowed(constrained.grammar, vocab) and 0 < len(finite) < vocab
        assert torch.equal(logits[0], before[0])  # an unconstrained row is untouched
        assert torch.equal(logits[1][sorted(finite)], before[1][sorted(finite)])
        token = int(torch.argmax(logits[1]))
        assert runtime.accept([free, constrained], [0, token]) == set()
        constrained.output_ids.append(token)


def test_a_finished_grammar_allows_only_the_stop_tokens(runtime):
    seq = Seq("a", 0, [5], SamplingParams(ignore_eos=True, structured_outputs=Spec(choice=("yes",))))
    for tok in _ids_of(runtime, "yes"):
        logits = torch.zeros(1, runtime.vocab_size)
        runtime.mask(logits, [seq])
        assert torch.isfinite(logits[0, tok])
        runtime.accept([seq], [tok])
        seq.output_ids.append(tok)
    for _ in range(2):  # EOS, then (ignore_eos) EOS again: nothing else is ever allowed
        logits = torch.zeros(1, runtime.vocab_size)
        runtime.mask(logits, [seq])
        assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == set(runtime.eos_token_ids)
        assert runtime.accept([seq], [runtime.eos_token_ids[0]]) == set()


def _ids_of(runtime, text: str) -> list[int]:
    from tetri.workers.grammar import load_hf_tokenizer

    return load_hf_tokenizer(runtime.model_dir).encode(text, add_special_tokens=False)


def test_a_token_outside_the_grammar_is_refused(runtime):
    seq = Seq("a", 0, [5], SamplingParams(structured_outputs=Spec(regex="[0-9]+")))
    logits = torch.zeros(1, runtime.vocab_size)
    runtime.mask(logits, [seq])
    outside = int(torch.isinf(logits[0]).nonzero()[0])
    assert runtime.accept([seq], [outside]) == {0}


def test_constrained_outputs_follow_their_grammars(llm):
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    regex = r"[a-c]{3}-[0-9]{2}"
    params = [
        SamplingParams(max_tokens=24, temperature=1.0, seed=1, n=3, structured_outputs=Spec(regex=regex)),
        SamplingParams(max_tokens=24, temperature=1.0, seed=2, n=2, structured_outputs=Spec(choice=("yes", "no way"))),
        SamplingParams(max_tokens=64, temperature=0.7, seed=3, structured_outputs=Spec(json=json.dumps(PERSON),
                                                                                       any_whitespace=False)),
    ]
    outs = llm.generate(prompts, params)
    for c in outs[0].outputs:
        assert re.fullmatch(regex, c.text) and c.finish_reason == "stop", c.text
    assert {c.text for c in outs[1].outputs} <= {"yes", "no way"} and all(c.finish_reason == "stop" for c in outs[1].outputs)
    person = outs[2].outputs[0]
    assert person.finish_reason == "stop", person.text
    jsonschema.validate(json.loads(person.text), PERSON)
    assert person.text == json.dumps(json.loads(person.text), ensure_ascii=False)  # no free whitespace: one layout


def test_max_tokens_ends_a_constrained_output_with_length(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0, structured_outputs=Spec(regex="[a-z]{40}")))
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 5 and re.fullmatch("[a-z]+", out[0].text)


def test_a_stop_token_ends_a_constrained_output_with_stop(llm):
    """A stop token the grammar allows ends the output there (finish_reason "stop"), the tokens
    before it as the unstopped run made them."""
    spec = Spec(regex=r"[0-9]{2}(, [0-9]{2}){9}")
    full = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=64, temperature=0.0, structured_outputs=spec))[0]
    assert full.finish_reason == "stop" and re.fullmatch(spec.regex, full.text), full.text
    stop_at = next(i for i in range(2, len(full.token_ids)) if full.token_ids[i] not in full.token_ids[:i])
    stopped = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=64, temperature=0.0, structured_outputs=spec,
                                                       stop_token_ids=(full.token_ids[stop_at],)))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:stop_at + 1]


def _text_prefix(tok, ids: list[int]) -> int:
    """How many of `ids` still spell (the start of) valid UTF-8 text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for i, t in enumerate(ids):
        try:
            decoder.decode(bytes(tok.token_info(t)[1]), final=False)
        except UnicodeDecodeError:
            return i
    return len(ids)


def test_an_allow_everything_grammar_leaves_greedy_output_unchanged(llm, default_model_dir):
    """Equal token for token while the unconstrained output is text; the random-weight model also
    emits byte tokens that are no UTF-8, which no text grammar allows, and from there they differ
    (the real model, whose greedy output is text, is checked whole in tests/runtime/test_real_structured.py)."""
    from tetri.server.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    prompts = [[5, 6, 7], [40, 41, 42, 43], list(range(60, 90)), [100, 7, 200, 9], [300, 301], [77] * 9]
    plain = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    allowed = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, structured_outputs=Spec(grammar=ALLOW_ALL)))
    compared = []
    for p, a in zip(plain, allowed):
        k = _text_prefix(tok, p.token_ids)
        assert a.token_ids[:k] == p.token_ids[:k]
        if k == len(p.token_ids):
            assert a.token_ids == p.token_ids and a.finish_reason == p.finish_reason
        compared.append(k)
    print(f"\ntokens equal before the first non-UTF-8 byte, per prompt: {compared}")
    assert sum(compared) >= 2 * len(prompts)


def test_strict_mode_forbids_what_the_schema_does_not_name(runtime):
    import xgrammar as xgr

    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    extra = '{"a": 1, "b": 2}'
    strict = xgr.GrammarMatcher(runtime.cache.get(Spec(json=schema, strict=True)))
    loose = xgr.GrammarMatcher(runtime.cache.get(Spec(json=schema, strict=False)))
    assert not strict.accept_string(extra)
    assert loose.accept_string(extra) and loose.is_completed()
    jsonschema.validate(json.loads(extra), json.loads(schema))  # what non-strict allows is still the schema


@pytest.mark.parametrize("spec,why", [
    (Spec(json='{"type": "frobnicate"}'), "frobnicate"),
    (Spec(regex="(ab"), "parenthesis"),
    (Spec(grammar="root ::= "), "EBNF"),
    (Spec(choice=("",)), "non-empty"),
])
def test_a_spec_that_does_not_compile_is_a_grammar_error(runtime, spec, why):
    with pytest.raises(GrammarError, match=why):
        compile_spec(runtime.cache.compiler, spec)


def test_min_tokens_cannot_be_combined_with_a_grammar():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=Spec(regex="a+")).validate()
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs=Spec(regex="a+", grammar='root ::= "a"')).validate()


def test_the_cache_compiles_a_spec_once_whatever_its_prefix(runtime):
    misses = runtime.cache.misses
    spec = Spec(regex="[xyz]{4}")
    runtime.check(spec)
    runtime.check(Spec(regex="[xyz]{4}", prefix_token_ids=(1, 2)))
    assert runtime.cache.misses == misses + 1 and spec.key == Spec(regex="[xyz]{4}", prefix_token_ids=(3,)).key
