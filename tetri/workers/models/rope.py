"""Rotary position embedding with the checkpoint's theta and scaling (default, llama3, and
the other types transformers knows), computed the way transformers does so fp32 outputs
match its `generate` exactly."""

from __future__ import annotations

import torch


def rope_params(hf_config) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from a transformers config of v4 or v5 vintage."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (None if kind == "default" else dict(params, rope_type=kind))
    theta = float(getattr(hf_config, "rope_theta", 10000.0))
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return theta, (None if kind == "default" else dict(scaling, rope_type=kind))
    return theta, None


def _inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    theta, scaling = rope_params(hf_config)
    if scaling is None:
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
        return 1.0 / (theta**exps), 1.0
    kind = scaling["rope_type"]
    if kind == "dynamic":
        raise ValueError("dynamic NTK rope scaling is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope scaling type {kind!r} is not supported")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding:
    """Holds a cos/sin table for positions [0, max_positions) in the model dtype."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, dtype: torch.dtype, device) -> None:
        inv_freq, scale = _inv_freq(hf_config, head_dim)
        pos = torch.arange(max_positions, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(dtype=dtype, device=device)
        self.sin = (emb.sin() * scale).to(dtype=dtype, device=device)
        self.max_positions = max_positions

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
