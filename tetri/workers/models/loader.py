"""Load a Llama-family checkpoint from a Hugging Face directory (config.json + *.safetensors,
sharded or not) with transformers' config class and safetensors for the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tetri.workers.models.llama import ArchSpec, LlamaFamilyModel
from tetri.workers.models.rope import RotaryEmbedding

SUPPORTED = {
    "LlamaForCausalLM": dict(),
    "MistralForCausalLM": dict(),
    "Qwen2ForCausalLM": dict(qkv_bias=True),
    "Qwen3ForCausalLM": dict(qk_norm=True),
}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModel(ValueError):
    pass


@dataclass
class LoadedModel:
    model: LlamaFamilyModel
    spec: ArchSpec
    hf_config: object
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    model_dir: str


def resolve_dtype(name: str, device: str, hf_config=None) -> torch.dtype:
    if name != "auto":
        return DTYPE_NAMES[name]
    if device.startswith("cpu"):
        return torch.float32
    ckpt = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    return ckpt if ckpt in (torch.bfloat16, torch.float16) else torch.bfloat16


def arch_spec(hf_config) -> ArchSpec:
    archs = list(getattr(hf_config, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        named = ", ".join(archs) or getattr(hf_config, "model_type", "unknown")
        raise UnsupportedModel(
            f"architecture {named} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return ArchSpec(
        name=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", 4096),
        sliding_window=getattr(hf_config, "sliding_window", None)
        if getattr(hf_config, "use_sliding_window", True) else None,
        **SUPPORTED[arch],
    )


def eos_ids(model_dir: Path, hf_config) -> tuple[int, ...]:
    ids: list[int] = []
    gen_path = model_dir / "generation_config.json"
    sources = [getattr(hf_config, "eos_token_id", None)]
    if gen_path.exists():
        sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in _weight_files(model_dir):
        weights.update(load_file(str(path)))
    return weights


def _fuse(spec: ArchSpec, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF names onto ours, concatenating q/k/v and gate/up for fewer, larger matmuls."""
    embed = raw["model.embed_tokens.weight"]
    head = embed if spec.tie_word_embeddings else raw.get("lm_head.weight", embed)
    out: dict[str, torch.Tensor] = {"embed_tokens.weight": embed, "norm.weight": raw["model.norm.weight"],
                                    "lm_head.weight": head}
    for i in range(spec.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        out[ours + "qkv_proj.weight"] = torch.cat([raw[attn + f"{p}_proj.weight"] for p in "qkv"])
        if spec.qkv_bias:
            out[ours + "qkv_proj.bias"] = torch.cat([raw[attn + f"{p}_proj.bias"] for p in "qkv"])
        if spec.qk_norm:
            out[ours + "q_norm.weight"] = raw[attn + "q_norm.weight"]
            out[ours + "k_norm.weight"] = raw[attn + "k_norm.weight"]
        out[ours + "o_proj.weight"] = raw[attn + "o_proj.weight"]
        mlp = hf + "mlp."
        out[ours + "gate_up_proj.weight"] = torch.cat([raw[mlp + "gate_proj.weight"], raw[mlp + "up_proj.weight"]])
        out[ours + "down_proj.weight"] = raw[mlp + "down_proj.weight"]
        out[ours + "input_layernorm.weight"] = raw[hf + "input_layernorm.weight"]
        out[ours + "post_attention_layernorm.weight"] = raw[hf + "post_attention_layernorm.weight"]
    return out


def load_model(model_dir: str, dtype: str = "auto", device: str = "cpu", max_positions: int | None = None) -> LoadedModel:
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json (expected a Hugging Face model directory)")
    hf_config = AutoConfig.from_pretrained(str(path))
    spec = arch_spec(hf_config)
    torch_dtype = resolve_dtype(dtype, device, hf_config)
    rope = RotaryEmbedding(hf_config, spec.head_dim, max_positions or spec.max_position_embeddings, torch_dtype, device)
    with torch.device("meta"):
        model = LlamaFamilyModel(spec, rope)
    state = _fuse(spec, _read_weights(path))
    model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=True, assign=True)
    model = model.to(device=device)
    model.eval()
    model.pack_linears()
    return LoadedModel(model, spec, hf_config, eos_ids(path, hf_config), torch_dtype, str(path))
