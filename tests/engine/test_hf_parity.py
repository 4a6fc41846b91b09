"""Greedy output must match Hugging Face `generate` (fp32, CPU) token for token."""

import random

import pytest
import torch

from tests.engine.tiny_models import build, hf_greedy, VOCAB
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
    expected = [hf_greedy(arch_dir, p, NEW_TOKENS) for p in ps]
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


def test_sharded_checkpoint_and_half_precision_load(tmp_path):
    d = build("qwen2", tmp_path / "m", max_shard_size="100KB")
    assert len(list(d.glob("*.safetensors"))) > 1
    ps = prompts(seed=2)[:3]
    expected = [hf_greedy(d, p, 4) for p in ps]
    llm = LLM(str(d), chunk_size=CHUNK)
    assert [o.token_ids for o in llm.generate(ps, SamplingParams(max_tokens=4, temperature=0.0))] == expected
    for dtype in ("bfloat16", "float16"):
        half = LLM(str(d), dtype=dtype, chunk_size=CHUNK)
        assert half.executor.pool.data.dtype == getattr(torch, dtype)
        out = half.generate(ps[0], SamplingParams(max_tokens=4, temperature=0.0))[0]
        assert len(out.token_ids) == 4


def test_unsupported_architecture_is_named(tmp_path):
    import json

    from tetri.workers.models.loader import UnsupportedModel, load_model

    d = build("llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        load_model(str(d))
