"""One frozen dataclass per subsystem, validated in __post_init__; no I/O here.

Each component receives its own sub-config, never the whole `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16", "auto")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
ROLES = ("prefill", "decode", "mixed")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """Hugging Face directory or GGUF file; None: the default model (`tetri.workers.models.source`)."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on CUDA)."""
    max_model_len: int | None = None
    """Prompt + output cap in tokens; None: the checkpoint's max_position_embeddings."""
    device: str = "cpu"
    seed: int = 0
    """Seed for unseeded random sampling."""
    attention: str = "auto"
    """auto (triton on CUDA, torch on CPU) | torch | triton (on CPU only under TRITON_INTERPRET=1)."""
    enforce_eager: bool = False
    """CUDA: run decode steps eagerly instead of replaying captured CUDA graphs (vLLM's flag)."""

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.attention in ATTENTION_BACKENDS,
                 f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        _require(self.device.split(":")[0] in ("cpu", "cuda"), f"unknown device {self.device!r}")
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_gb: float | None = None
    """KV pool size on CPU (default: 1 GiB, at most 8192 blocks). A worker caps max_model_len to
    what its pool holds, so one request of max_model_len always fits."""
    gpu_memory_utilization: float = 0.9
    """Share of GPU memory a CUDA worker may use for weights + KV (divided among workers on a GPU)."""
    num_blocks: int | None = None
    """Exact pool size in blocks (overrides the memory budget; tests use it)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full prompt blocks already computed on the worker (vLLM's flag and default)."""
    kv_offloading_size: float = 0.0
    """GiB of host memory per worker for the prefix cache's host tier (vLLM's flag and unit; 0: off):
    evicted cached blocks are copied there and copied back on a hit instead of recomputed."""
    swap_space: float = 0.0
    """GiB of host memory per decoding worker for swapped-out KV of preempted requests (vLLM's
    flag and unit; 0: preemption always recomputes). Shares the host tier with kv_offloading_size."""

    def __post_init__(self) -> None:
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256), "block_size must be a power of 2 <= 256")
        _require(self.kv_cache_gb is None or self.kv_cache_gb > 0, "kv_cache_gb must be > 0")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]")
        _require(self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1")
        _require(self.kv_offloading_size >= 0, "kv_offloading_size must be >= 0")
        _require(self.swap_space >= 0, "swap_space must be >= 0")


@dataclass(frozen=True)
class EngineSchedConfig:
    """Per-worker (instance-level) scheduling knobs."""

    chunk_size: int = 512
    """Prefill chunk: exactly this many prompt tokens per forward pass (TetriInfer's ChunkSize)."""
    max_num_seqs: int = 256
    """Most requests decoding at once on one worker."""
    decode_policy: str = "greedy"
    heavy_decode_tokens: int = 128
    """A decode predicted to produce more tokens than this counts as heavy on the load board."""
    preemption_mode: str = "auto"
    """A decode worker's preempted request: "swap" its KV to the host (needs swap_space),
    "recompute" it, or "auto": whichever measured cost is lower (`tetri.sched.swap`)."""
    step_budget: str = "fixed"
    """A mixed step's prompt tokens: "fixed" (chunk_size) or "slo" (the largest budget whose
    step, fitted to the measured step times, fits step_tpot_s; `tetri.sched.step_budget`)."""
    step_tpot_s: float | None = None
    """The declared TPOT SLO the "slo" step budget holds mixed steps to (None: fixed)."""

    def __post_init__(self) -> None:
        _require(self.chunk_size >= 1, "chunk_size must be >= 1")
        _require(self.step_budget in ("fixed", "slo"), "step_budget must be fixed or slo")
        _require(self.step_tpot_s is None or self.step_tpot_s > 0, "step_tpot_s must be > 0")

    @property
    def max_step_prompt_tokens(self) -> int:
        """Most prompt tokens one mixed step may carry: what the CUDA memory profile sizes the
        activations for (the "slo" step budget's cap, `tetri.sched.step_budget.MAX_CHUNKS`)."""
        from tetri.sched.step_budget import MAX_CHUNKS

        return self.chunk_size * (MAX_CHUNKS if self.step_budget == "slo" and self.step_tpot_s else 1)
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.heavy_decode_tokens >= 0, "heavy_decode_tokens must be >= 0")
        _require(self.preemption_mode in ("auto", "swap", "recompute"), "preemption_mode must be auto, swap or recompute")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sched: EngineSchedConfig = field(default_factory=EngineSchedConfig)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front end."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | tuple[str, ...] | None = None
    """Name(s) clients may send as `model` (the first is reported); None: the model directory's base name."""
    api_key: str | None = None
    """When set, every route but /health needs `Authorization: Bearer <key>`."""
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    max_tokens_cap: int | None = None
    """Upper bound on a request's max_tokens (None: only max_model_len bounds it)."""
    tool_call_parser: str | None = None
    """vLLM's --tool-call-parser: how `tool_choice: "auto"` output is read ("hermes", "llama3_json")."""
    enable_auto_tool_choice: bool = False
    """vLLM's --enable-auto-tool-choice: `tool_choice: "auto"` (the default with tools) is served."""
    max_grammar_bytes: int = 64 * 1024
    """Largest schema / regex / grammar a request may constrain its output with (a 400 past it)."""
    grammar_compile_timeout_s: float = 10.0
    """A grammar that takes longer to compile is a 400 (the compile is ended)."""

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port must be in [0, 65535]")
        _require(self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024")
        _require(self.max_n >= 1, "max_n must be >= 1")
        _require(self.max_grammar_bytes >= 1, "max_grammar_bytes must be >= 1")
        _require(self.grammar_compile_timeout_s > 0, "grammar_compile_timeout_s must be > 0")
        _require(not self.enable_auto_tool_choice or self.tool_call_parser is not None,
                 "enable_auto_tool_choice needs a tool_call_parser")
