"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a flat token batch.

The forward pass takes every scheduled token of the step in one flat batch `[T]` (prefill
pieces and decode tokens alike); linear layers run on `[T, hidden]` and attention is
delegated to an `AttentionBackend` that writes the new K/V into the paged pool and attends
per sequence. Per-architecture differences are switches on `ArchSpec`:

    Llama / Mistral : plain q/k/v projections
    Qwen2           : q/k/v bias, tied embeddings on small models
    Qwen3           : RMSNorm on q and k per head, explicit head_dim
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tetri.workers import cpu_kernels
from tetri.workers.models.rope import RotaryEmbedding


@dataclass(frozen=True)
class ArchSpec:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None


class Linear(nn.Module):
    """`x W^T (+ b)` with W stored `[out, in]`, as in Hugging Face checkpoints.

    `pack()` (CPU, fp32) swaps W for a packed copy a faster GEMM reads: the 24-column panels
    of `cpu_kernels.linear` and/or oneDNN's prepacked weight, as the per-machine calibration
    chose per rows bucket (see `cpu_kernels`).
    Library GEMMs run decode-sized batches at half the CPU's FMA peak, and MKL's sgemm also
    re-packs the weight on every call. Measured side by side on 2 cores, a Llama layer's
    four linears at 16 rows: oneDNN's packed weight 1.36x faster than `(W @ x^T)^T`, and the
    panels 1.3-1.6x faster than oneDNN (1.25x at 64 rows, 1.1x at a 512-row prefill chunk);
    on an AVX-512 Xeon oneDNN won, hence the calibration. The dense weight is dropped once
    packed (each packed copy is the same size; both are kept only where the choice differs
    between rows buckets).
    """

    PACK_ROWS_HINT = 16  # oneDNN picks its blocking for this many rows; measured insensitive

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN's layout
        self.panels: torch.Tensor | None = None  # cpu_kernels' layout
        self._kernels = None
        self._route = False  # both layouts kept: each call picks by its rows

    def pack(self, kernel: str = "auto") -> bool:
        """Pack the weight for the GEMMs that run it: "auto" keeps the layouts this machine's
        calibration chose (`cpu_kernels.gemm_layouts`: the panels, oneDNN's, or both, routed
        by rows), "panels" or "onednn" force one; False (and dense kept) where none applies."""
        w = self.weight
        if w is None or not w.is_cpu or w.dtype != torch.float32:
            return False
        want = cpu_kernels.gemm_layouts() if kernel == "auto" else {"panels": {cpu_kernels.KERNEL},
                                                                     "onednn": {cpu_kernels.LIBRARY}}[kernel]
        if cpu_kernels.KERNEL in want:
            self._kernels = cpu_kernels.load()
            if self._kernels is None:
                return False
            self.panels = cpu_kernels.pack(w)
        if cpu_kernels.LIBRARY in want or not want:
            self.packed = _onednn_pack(w, self.PACK_ROWS_HINT)
        if self.panels is None and self.packed is None:
            return False
        self._route = self.panels is not None and self.packed is not None
        self.weight = None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels is not None and (not self._route or cpu_kernels.gemm_uses_kernel(x.numel() // x.shape[-1])):
            return cpu_kernels.linear(self._kernels, x, self.panels, self.out_features, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_pack(w: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """oneDNN's prepacked copy of `w`, or None where this torch lacks the op."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
    except (RuntimeError, AttributeError):  # a torch built without the op
        return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one call instead of seven; bit-identical to the steps below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(spec.hidden_size, q_size + 2 * kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(q_size, spec.hidden_size)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, rope: RotaryEmbedding, cos_sin, attn) -> torch.Tensor:
        t = hidden.shape[0]
        x = self.input_layernorm(hidden)
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, k, cos_sin)
        o = attn.forward(self.layer_idx, q, k, v)
        hidden = hidden + self.o_proj(o.reshape(t, -1))
        x = self.post_attention_layernorm(hidden)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)


class LlamaFamilyModel(nn.Module):
    def __init__(self, spec: ArchSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        self.rope = rope
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """Hidden states after the final norm, `[T, hidden]`."""
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rope.cos_sin(positions)
        for layer in self.layers:
            hidden = layer(hidden, self.rope, cos_sin, attn)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def pack_linears(self) -> int:
        """`Linear.pack()` every linear layer (CPU fp32); returns how many were packed."""
        return sum(m.pack() for m in self.modules() if isinstance(m, Linear))
