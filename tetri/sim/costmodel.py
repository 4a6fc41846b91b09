"""Roofline cost model of one forward pass, with hardware and model presets.

One iteration (a prefill chunk, a decode step, or both fused) costs

    dense_flops  = 2 * layer_params * (prefill_tokens + decode_reqs)         batched GEMMs
                 + 2 * hidden * vocab * sampled_rows                           lm_head
    attn_flops   = 4 * layers * q_width * attended_pairs                       QK^T and AV
    weight_bytes = layer weights + lm_head (read once per pass)
    kv_bytes     = kv_bytes_per_token * kv_tokens (context read + new KV written)
    time_s = max(dense_flops / (peak * compute_eff), weight_bytes / (bw * memory_eff))
           + attn_flops / (peak * compute_eff) + kv_bytes / (bw * memory_eff)
           + overhead_s + prefill_pieces * piece_overhead_s + step_latency_s

`step_latency_s` and `request_latency_s` are the serving stack's share: what a live server adds
to each engine step (worker-loop I/O, the front's work competing for the host) and to each
request (HTTP, dispatch, first-token delivery; the simulator delays a request's arrival at
the scheduler by it). They are 0 in the presets (the engine-only view) and fitted from one
live run by `tetri-sim fit-serving` (`tetri.sim.serving_fit`).

The GEMMs see every token of the batch at once, so they are either compute or weight-bandwidth
bound (the roofline max); attention runs per sequence in its own kernels, so its cost adds.
`attended_pairs` sums, over every new token, the context it attends to (a prefill piece of l
tokens starting at position s: l*s + l*(l+1)/2; a decode token: its whole context).
Prefill iterations (any prompt tokens) use `prefill_compute_eff` / `prefill_overhead_s`,
decode-only ones `decode_compute_eff` / `decode_overhead_s`. KV handoff between GPUs:
bytes / link bandwidth + latency.

Check against DistServe's fitted A100 OPT-13B numbers (papers.md §2.5): a 512-token prefill
is 71 + 2 = 73 ms here (DistServe engine 72 ms, vLLM 96 ms); a decode step at batch 32,
context 600 is 29 + 2 = 31 ms (DistServe 33 ms). The default efficiencies come from that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    peak_flops: float
    """Dense bf16/fp16 tensor FLOP/s (no sparsity)."""
    hbm_bytes_s: float
    memory_bytes: float
    link_bytes_s: float
    """GPU-to-GPU bandwidth for a KV copy, one direction."""
    host_link_bytes_s: float
    """GPU-host (PCIe) bandwidth, one direction."""
    host_link_eff: float = 0.8
    """Share of `host_link_bytes_s` a pinned-memory DMA copy reaches (assumed, not measured)."""
    link_latency_s: float = 50e-6
    prefill_compute_eff: float = 0.6
    decode_compute_eff: float = 0.5
    memory_eff: float = 0.7
    prefill_overhead_s: float = 2e-3
    decode_overhead_s: float = 2e-3
    piece_overhead_s: float = 0.0
    """Extra time per prompt piece in a pass (per-sequence launches; calibrated on CPU)."""
    step_latency_s: float = 0.0
    """What a live server adds to every engine step (fitted by `tetri-sim fit-serving`)."""
    request_latency_s: float = 0.0
    """What a live server adds to every request before its first token (HTTP, dispatch)."""
    memory_utilization: float = 0.9
    kv_cache_bytes: float | None = None
    """Fixed KV pool size (the CPU engine's default pool); None: memory * util - weights."""
    max_kv_blocks: int | None = None


# Public spec sheets (dense tensor throughput, i.e. without 2:4 sparsity; NVLink aggregate
# bandwidth halved for one direction; PCIe x16 one direction):
#   H100 SXM5 80GB: BF16 989.4 TFLOP/s, HBM3 3.35 TB/s, NVLink 4 900 GB/s, PCIe Gen5 64 GB/s
#   H200 SXM 141GB: BF16 989.4 TFLOP/s, HBM3e 4.8 TB/s, NVLink 4 900 GB/s, PCIe Gen5 64 GB/s
#   A100 SXM4 80GB: BF16 312 TFLOP/s, HBM2e 2,039 GB/s, NVLink 3 600 GB/s, PCIe Gen4 32 GB/s
#   V100 SXM2 32GB: FP16 125 TFLOP/s, HBM2 900 GB/s, NVLink 2 300 GB/s, PCIe Gen3 16 GB/s
# `cpu` is a nominal 2-core host meant to be calibrated (`tetri-sim profile` + --calibration);
# its KV pool mirrors the CPU engine's default (1 GiB, at most 8192 blocks).
HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "h100": HardwareSpec("h100", 989.4e12, 3.35e12, 80 * GIB, 450 * GB, 64 * GB),
    "h200": HardwareSpec("h200", 989.4e12, 4.8e12, 141 * GB, 450 * GB, 64 * GB),
    "a100": HardwareSpec("a100", 312e12, 2.039e12, 80 * GIB, 300 * GB, 32 * GB),
    "v100": HardwareSpec("v100", 125e12, 0.9e12, 32 * GIB, 150 * GB, 16 * GB),
    "cpu": HardwareSpec("cpu", 1e11, 2e10, 16 * GIB, 5 * GB, 5 * GB, link_latency_s=20e-6,
                        prefill_compute_eff=0.3, decode_compute_eff=0.3, memory_eff=0.5,
                        prefill_overhead_s=1e-3, decode_overhead_s=1e-3,
                        kv_cache_bytes=1.0 * GIB, max_kv_blocks=8192),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    bytes_per_param: int = 2
    mlp_matrices: int = 3
    """3 for a gated (SwiGLU) MLP, 2 for OPT's fc1/fc2."""
    max_model_len: int = 8192
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Parameters of all decoder layers (attention + MLP; norms and biases ignored)."""
        attn = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (attn + self.mlp_matrices * self.hidden * self.intermediate)

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layer_params + embeddings

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_param

    @property
    def read_weight_bytes(self) -> int:
        """Weights one forward pass streams: the layers and the lm_head (not the embedding)."""
        return (self.layer_params + self.vocab * self.hidden) * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    @classmethod
    def from_hf_config(cls, name: str, cfg: dict, bytes_per_param: int = 4) -> ModelSpec:
        """From a Hugging Face Llama-family config.json dict."""
        heads = int(cfg["num_attention_heads"])
        return cls(name, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), heads,
                   int(cfg.get("num_key_value_heads") or heads), int(cfg["intermediate_size"]),
                   int(cfg["vocab_size"]), bytes_per_param, 3, int(cfg.get("max_position_embeddings", 4096)),
                   bool(cfg.get("tie_word_embeddings", False)))


# Published configs (Hugging Face config.json of each model); the last two are this project's
# embedded default model (tetri.workers.models.default_model) and the ~100M bench model
# (tools/bench_engine.py), both float32.
MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 2, 3, 8192),
    "llama3.1-8b": ModelSpec("llama3.1-8b", 32, 4096, 32, 8, 14336, 128256, 2, 3, 131072),  # same, 128k context
    "llama2-13b": ModelSpec("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 2, 3, 4096),
    "opt-13b": ModelSpec("opt-13b", 40, 5120, 40, 40, 20480, 50272, 2, 2, 2048, True),
    "qwen2.5-32b": ModelSpec("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064, 2, 3, 32768),
    "tiny-default": ModelSpec("tiny-default", 2, 128, 4, 2, 256, 512, 4, 3, 4096),
    "llama-100m": ModelSpec("llama-100m", 12, 768, 12, 12, 2048, 32000, 4, 3, 1024),
}


class StepShape(NamedTuple):
    """What one forward pass computes (the cost model's only input)."""

    prefill_tokens: int = 0
    attended_pairs: int = 0
    kv_tokens: int = 0
    sampled_rows: int = 0
    decode_reqs: int = 0
    prefill_pieces: int = 0


class Features(NamedTuple):
    dense_flops: float
    attn_flops: float
    weight_bytes: float
    kv_bytes: float
    pieces: int


def piece_shape(new_tokens: int, start_tokens: int, sample: bool = True) -> StepShape:
    """A prefill piece: `new_tokens` prompt tokens after `start_tokens` already cached."""
    pairs = new_tokens * start_tokens + new_tokens * (new_tokens + 1) // 2
    return StepShape(new_tokens, pairs, start_tokens + new_tokens, int(sample), 0, 1)


def decode_shape(batch_reqs: int, context_tokens: int) -> StepShape:
    """`batch_reqs` decode tokens whose contexts sum to `context_tokens` (each includes itself)."""
    return StepShape(0, context_tokens, context_tokens, batch_reqs, batch_reqs, 0)


def add_shapes(a: StepShape, b: StepShape) -> StepShape:
    return StepShape(*(x + y for x, y in zip(a, b)))


class CostModel:
    def __init__(self, model: ModelSpec, hardware: HardwareSpec) -> None:
        self.model = model
        self.hw = hardware

    def features(self, shape: StepShape) -> Features:
        m = self.model
        dense = (2.0 * m.layer_params * (shape.prefill_tokens + shape.decode_reqs)
                 + 2.0 * m.hidden * m.vocab * shape.sampled_rows)
        attn = 4.0 * m.layers * m.heads * m.head_dim * shape.attended_pairs
        return Features(dense, attn, float(m.read_weight_bytes), float(m.kv_bytes_per_token * shape.kv_tokens),
                        shape.prefill_pieces)

    def step_s(self, shape: StepShape) -> float:
        hw = self.hw
        f = self.features(shape)
        prefill = shape.prefill_tokens > 0
        s_per_flop = 1.0 / (hw.peak_flops * (hw.prefill_compute_eff if prefill else hw.decode_compute_eff))
        s_per_byte = 1.0 / (hw.hbm_bytes_s * hw.memory_eff)
        overhead_s = hw.prefill_overhead_s if prefill else hw.decode_overhead_s
        return (max(f.dense_flops * s_per_flop, f.weight_bytes * s_per_byte) + f.attn_flops * s_per_flop
                + f.kv_bytes * s_per_byte + overhead_s + f.pieces * hw.piece_overhead_s + hw.step_latency_s)

    def prefill_s(self, prompt_tokens: list[int]) -> float:
        """One batch of whole prompts, prefilled from scratch."""
        shape = StepShape()
        for n in prompt_tokens:
            shape = add_shapes(shape, piece_shape(n, 0))
        return self.step_s(shape)

    def decode_s(self, batch_reqs: int, context_tokens: int) -> float:
        return self.step_s(decode_shape(batch_reqs, context_tokens))

    def transfer_s(self, tokens: int) -> float:
        """Copy one request's KV between two GPUs of the node."""
        return self.model.kv_bytes_per_token * tokens / self.hw.link_bytes_s + self.hw.link_latency_s

    def host_copy_s(self, tokens: int) -> float:
        """Copy KV between the GPU pool and pinned host memory (the prefix cache's host tier),
        over PCIe, serialized with the step as tetri-serve issues it (one stream)."""
        if tokens <= 0:
            return 0.0
        return self.model.kv_bytes_per_token * tokens / (self.hw.host_link_bytes_s * self.hw.host_link_eff) \
            + self.hw.link_latency_s

    def host_blocks(self, size_gib: float, block_size: int) -> int:
        """Host-tier blocks of `size_gib` GiB (`--kv-offloading-size`)."""
        return int(size_gib * GIB // (self.model.kv_bytes_per_token * block_size)) if size_gib > 0 else 0

    def kv_capacity_blocks(self, block_size: int) -> int:
        """KV blocks one worker's pool holds."""
        hw = self.hw
        budget = hw.kv_cache_bytes
        if budget is None:
            budget = hw.memory_bytes * hw.memory_utilization - self.model.weight_bytes
        blocks = int(budget // (self.model.kv_bytes_per_token * block_size))
        if hw.max_kv_blocks is not None:
            blocks = min(blocks, hw.max_kv_blocks)
        if blocks < 1:
            raise ValueError(f"{self.model.name} does not fit on {hw.name}: no memory left for KV")
        return blocks


def with_overrides(hw: HardwareSpec, **changes) -> HardwareSpec:
    """A copy of `hw` with some fields replaced (None values are ignored)."""
    return dataclasses.replace(hw, **{k: v for k, v in changes.items() if v is not None})


def lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(table)}")
    return table[name]
