"""Tiny random-weight checkpoints of each supported architecture, built with transformers
from configs written here (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig(**COMMON, rope_theta=50000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}),
        "mistral": MistralConfig(**COMMON, sliding_window=4096),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
    }


def build(arch: str, out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = configs()[arch]
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    return out


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32) -> list[int]:
    return hf_greedy_each(model_dir, [prompt], max_new_tokens, dtype)[0]


def hf_greedy_each(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
                   dtype: torch.dtype = torch.float32, ignore_eos: bool = False) -> list[list[int]]:
    """HF `generate` greedy for each prompt alone (batch 1: no padding), the model loaded once;
    `ignore_eos`: always `max_new_tokens` (SamplingParams.ignore_eos)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    if ignore_eos:
        model.generation_config.eos_token_id = None
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    return outs
