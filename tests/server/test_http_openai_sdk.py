"""The official `openai` SDK against the app on a real port, backed by the fake engine."""

from __future__ import annotations

MODEL = "default-model-v1"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


async def test_models(live):
    models = await live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_chat_non_streaming(live, tok):
    resp = await live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 7
    req = live.engine.submitted[-1]
    assert resp.usage.prompt_tokens == len(req.prompt_token_ids)
    text = tok.hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert req.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert req.params.max_tokens == 7 and live.engine.num_running() == 0


async def test_chat_streaming_with_usage(live):
    stream = await live.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=9, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["prompt_token_ids"] == live.engine.submitted[-1].prompt_token_ids
    content = [c for c in chunks if c.choices]
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    streamed = sum(len(c.choices[0].model_extra.get("token_ids") or []) for c in content)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == streamed == 9
    assert usage.total_tokens == usage.prompt_tokens + 9


async def test_continuous_usage_stats(live):
    stream = await live.client().completions.create(
        model=MODEL, prompt="abc", max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    chunks = [c async for c in stream]
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 5 and all(c.usage is not None for c in chunks)


async def test_completions_non_streaming_and_default_max_tokens(live):
    resp = await live.client().completions.create(model=MODEL, prompt="The quick brown fox")
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


async def test_chat_default_max_tokens_fills_context(serve):
    live = await serve(max_model_len=64)
    resp = await live.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == 64


async def test_completions_streaming_text_matches_non_streaming(live):
    args = dict(model=MODEL, prompt="Hello", max_tokens=12, seed=5)
    full = await live.client().completions.create(**args)
    stream = await live.client().completions.create(**args, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == full.choices[0].text and text


async def test_n2_and_multi_prompt_indices(live):
    resp = await live.client().completions.create(model=MODEL, prompt=["one", "two", "three"], n=2, max_tokens=3)
    assert sorted(c.index for c in resp.choices) == list(range(6))
    assert resp.usage.completion_tokens == 18
    chat = await live.client().chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    stream = await live.client().chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4, stream=True)
    finished = {c.choices[0].index for c in [c async for c in stream] if c.choices[0].finish_reason}
    assert finished == {0, 1}


async def test_token_id_prompts(live):
    resp = await live.client().completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, extra_body={"return_token_ids": True})
    by_index = {c.index: c.model_extra for c in resp.choices}
    assert by_index[0]["prompt_token_ids"] == [5, 6, 7] and by_index[1]["prompt_token_ids"] == [8, 9]
    assert all(len(v["token_ids"]) == 2 for v in by_index.values())


async def test_seed_reproducibility(live):
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0)
    a = await live.client().chat.completions.create(**args, seed=42)
    b = await live.client().chat.completions.create(**args, seed=42)
    c = await live.client().chat.completions.create(**args, seed=43)
    assert a.choices[0].message.content == b.choices[0].message.content != c.choices[0].message.content
    assert live.engine.submitted[-1].params.seed == 43


async def test_stop_string_split_across_tokens(serve, tok):
    ids = tok.encode("The quick brown fox jumps", add_special_tokens=False)
    live = await serve(script=ids)
    for stream in (False, True):
        resp = await live.client().completions.create(model=MODEL, prompt="x", max_tokens=30, stop=["ck bro", "zzz"], stream=stream)
        if stream:
            chunks = [c async for c in resp]
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = resp.choices[0].text, resp.choices[0].finish_reason
        assert (text, reason) == ("The qui", "stop")
    assert live.engine.num_running() == 0
    assert len(live.engine.aborted) == 2  # the engine was told to stop, once per request


async def test_multibyte_streaming_through_fake(serve, tok):
    ids = tok.encode("東京 😀 café", add_special_tokens=False)
    live = await serve(script=ids)
    stream = await live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=len(ids), stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "東京 😀 café"


async def test_eos_and_stop_token_ids(serve):
    live = await serve(eos_after=3)
    resp = await live.client().completions.create(model=MODEL, prompt="hi", max_tokens=10, extra_body={"return_token_ids": True})
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].model_extra["token_ids"][-1] == 1
    assert resp.usage.completion_tokens == 4
    resp = await live.client().completions.create(model=MODEL, prompt="hi", max_tokens=10, extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"


async def test_chat_logprobs(live, tok):
    resp = await live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 3 for e in content)
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    assert all(e.logprob <= 0 and bytes(e.bytes).decode() == e.token for e in content)
    stream = await live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True, stream=True)
    entries = [e for c in [c async for c in stream] if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 5 and all(e.top_logprobs == [] for e in entries)


async def test_completion_logprobs(live):
    resp = await live.client().completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == resp.choices[0].text
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)


async def test_sampling_params_reach_engine(live):
    await live.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0.5, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=-0.5, stop="x", extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 1,
                                                      "stop_token_ids": [7], "priority": 3, "ignore_eos": True},
    )
    req = live.engine.submitted[-1]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (3, 0.5, 0.9, 5, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (p.min_tokens, p.stop_token_ids, p.ignore_eos, req.priority) == (1, (7,), True, 3)


async def test_content_parts(live):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}]
    resp = await live.client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert resp.choices[0].finish_reason == "length"
