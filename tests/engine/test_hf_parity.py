"""Greedy output must match Hugging Face `generate` (fp32, CPU) token for token, and agree with it
in bf16/fp16 up to a stated share (near-ties may flip in half precision)."""

import json
import random

import pytest
import torch

from tests.engine.tiny_models import build, hf_greedy, hf_greedy_each, VOCAB
from tetri import LLM, SamplingParams

CHUNK = 64
LENGTHS = [1, 5, 17, 63, 64, 65, 130, 192]  # 1 .. 3x chunk_size: split and shared chunks
NEW_TOKENS = 12


def prompts(seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def arch_dir(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


def test_greedy_matches_hf(arch_dir):
    ps = prompts()
    expected = hf_greedy_each(arch_dir, ps, NEW_TOKENS)
    llm = LLM(str(arch_dir), dtype="float32", chunk_size=CHUNK, check_invariants=True)
    outs = llm.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for out, exp, p in zip(outs, expected, ps):
        assert out.token_ids == exp, f"prompt of {len(p)} tokens diverged"
    assert llm.executor.blocks.num_free == llm.executor.blocks.num_blocks
    llm.close()


def test_preemption_under_a_small_pool_keeps_greedy_exact(tmp_path):
    d = build("llama", tmp_path / "m")
    ps = prompts(seed=1)
    expected = [hf_greedy(d, p, NEW_TOKENS) for p in ps]
    # 24 blocks of 16 tokens cannot hold all eight sequences at once: decodes get preempted
    # and recomputed, prompts wait for blocks.
    llm = LLM(str(d), chunk_size=CHUNK, num_blocks=24, check_invariants=True)
    outs = llm.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert [o.token_ids for o in outs] == expected
    assert llm.executor.blocks.num_free == 24


def test_sharded_checkpoint_loads(tmp_path):
    d = build("qwen2", tmp_path / "m", max_shard_size="100KB")
    assert len(list(d.glob("*.safetensors"))) > 1
    ps = prompts(seed=2)[:3]
    expected = [hf_greedy(d, p, 4) for p in ps]
    llm = LLM(str(d), chunk_size=CHUNK)
    assert [o.token_ids for o in llm.generate(ps, SamplingParams(max_tokens=4, temperature=0.0))] == expected


MIN_HALF_SHARE = 0.8
"""Of the 8 x 8 greedy tokens, the share that equals HF's in the same dtype up to each prompt's
first divergence. Each op (RMSNorm upcast to fp32 and cast back, the rope table computed in fp32
and cast, bf16/fp16 linears, lm_head in the model dtype and then fp32) is HF's, so a prompt
decoded alone matched HF exactly in every case here. Batched, decode attention runs over padded
slots (SDPA with a mask, whose half-precision rounding differs from an unpadded call) and
greedy can flip at near-ties: measured 0.91 (llama bf16: one prompt diverges at its 3rd token)
and 1.0 in the other cases (bf16 on mistral, qwen2, qwen3; fp16 on llama; fp16 on qwen3 too,
measured once, not run in the suite). With RMSNorm computed in bf16 instead, llama bf16 drops to 0.72."""


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


HALF_NEW_TOKENS = 8  # HF's bf16/fp16 CPU matmuls are slow: 8 tokens keep the 5 cases near 15 s


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_greedy_agrees_with_hf_in_the_same_dtype(arch_dir, dtype):
    if dtype == "float16" and json.loads((arch_dir / "config.json").read_text())["model_type"] != "llama":
        pytest.skip("fp16 on llama only (suite time: HF's half-precision CPU matmuls are slow)")
    ps = prompts()
    expected = hf_greedy_each(arch_dir, ps, HALF_NEW_TOKENS, getattr(torch, dtype))
    llm = LLM(str(arch_dir), dtype=dtype, chunk_size=CHUNK)
    assert llm.executor.pool.data.dtype == getattr(torch, dtype)
    outs = llm.generate(ps, SamplingParams(max_tokens=HALF_NEW_TOKENS, temperature=0.0))
    agree = [first_divergence(o.token_ids, e) for o, e in zip(outs, expected)]
    print(f"{dtype}: tokens agreeing with HF up to the first divergence, per prompt: {agree}")
    assert all(n >= 1 for n in agree), agree  # every prefill's greedy token is HF's
    assert sum(agree) / (HALF_NEW_TOKENS * len(ps)) >= MIN_HALF_SHARE, agree
    llm.close()


def test_unsupported_architecture_is_named(tmp_path):
    from tetri.workers.models.loader import UnsupportedModel, load_model

    d = build("llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        load_model(str(d))
