"""CUDA paths: skipped without a GPU (the conftest skips every `gpu` test when CUDA is absent)."""

import pytest
import torch

from tests.engine.test_hf_parity import CHUNK, NEW_TOKENS, prompts
from tests.engine.tiny_models import build, hf_greedy
from tetri import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_cuda_fp32_greedy_matches_hf(tmp_path):
    d = build("llama", tmp_path / "m")
    ps = prompts()
    expected = [hf_greedy(d, p, NEW_TOKENS) for p in ps]
    llm = LLM(str(d), device="cuda", dtype="float32", chunk_size=CHUNK, check_invariants=True)
    outs = llm.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert [o.token_ids for o in outs] == expected


def test_flash_backend_matches_torch_backend(tmp_path):
    pytest.importorskip("flash_attn")
    from tetri.workers.attention import FlashAttention, TorchAttention

    d = build("qwen3", tmp_path / "m")
    ps = prompts()
    runs = {}
    for backend in (TorchAttention, FlashAttention):
        llm = LLM(str(d), device="cuda", dtype="bfloat16", chunk_size=CHUNK)
        runner = llm.executor.runner
        runner.attn = backend(llm.executor.pool, runner.loaded.spec.head_dim ** -0.5)
        runs[backend.name] = [o.token_ids for o in llm.generate(ps, SamplingParams(max_tokens=8, temperature=0.0))]
    same = sum(a == b for a, b in zip(runs["torch"], runs["flash"]))
    assert same >= len(ps) - 1  # bf16: allow one near-tie to flip


def test_cuda_bf16_runs_and_frees_everything(tmp_path):
    d = build("mistral", tmp_path / "m")
    llm = LLM(str(d), device="cuda", dtype="bfloat16", chunk_size=CHUNK, check_invariants=True)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=4, temperature=0.0))
    assert all(len(o.token_ids) == 4 for o in outs)
    assert llm.executor.blocks.num_free == llm.executor.blocks.num_blocks
    assert torch.cuda.is_available()
