"""Every message that crosses a process boundary: msgspec Structs, tagged, one union per
channel, encoded with msgpack (never pickle).

Channels (ZeroMQ PUSH -> PULL over ipc:// sockets in a private 0700 directory):
    front -> worker : ToWorker   = ChunkPlan | Handoff | Release | Abort | SubmitMixed | SetRole | Shutdown
                                 | PeerPools
    worker -> front : FromWorker = Ready | ChunkDone | KVCopied | Dropped | TokenBatch | WorkerError
                                 | PeerPaths

Fields are only ever appended (wire compatibility within PROTOCOL_VERSION).
"""

from __future__ import annotations

from typing import Union

import msgspec

from tetri.types import SamplingParams, TokenLogprob

PROTOCOL_VERSION = 1


class _Msg(msgspec.Struct, tag=True, kw_only=True, omit_defaults=True):
    pass


# ---- shared pieces ------------------------------------------------------------------


class PoolInfo(msgspec.Struct, kw_only=True):
    """How a peer opens a worker's KV pool (block-major layout, see workers/kv_pool.py)."""

    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    shm_name: str | None = None  # CPU: named shared-memory segment
    cuda_ipc: bytes | None = None  # CUDA: the 64-byte IPC handle of the allocation holding the pool
    # ---- appended (CUDA IPC handoff, workers/kv_transfer.py) ----
    canary: bytes = b""  # 16 random bytes; the pool's last 64 bytes (past its blocks) are them 4 times
    owner_pid: int = 0
    block_bytes: int = 0
    layout: str = ""  # axis order of the contiguous pool (kv_pool.LAYOUT)
    ipc_offset: int = 0  # CUDA: the pool's start minus the base of the allocation the handle covers
    ipc_size: int = 0  # CUDA: that allocation's size in bytes
    device_uuid: bytes = b""  # CUDA: the owner's GPU (16 bytes; device indices differ between processes)
    device_index: int = -1  # the owner's device ordinal in its own process (for messages only)
    export_error: str | None = None  # CUDA: why no IPC handle was exported
    stage_shm: str | None = None  # host-staged fallback: the pool's shared-memory mirror (workers/kv_stage.py)


class NewReq(msgspec.Struct, kw_only=True):
    """A request's data, sent once with its first piece."""

    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float = 0.0
    priority: int = 0
    """vLLM's semantics: lower values are served first."""
    prior_output_tokens: int = 0
    """A migrated request: the last this-many prompt tokens are outputs it already emitted
    (they count as outputs for max_tokens, min_tokens, penalties and the seeded draws)."""


class PlanPiece(msgspec.Struct, kw_only=True, omit_defaults=True):
    req_id: str
    start: int
    num_tokens: int
    is_last: bool
    new: NewReq | None = None


class PrefillResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A prompt whose last piece ran: its first tokens (one per choice) and its KV blocks."""

    req_id: str
    block_ids: list[int]
    num_prompt_tokens: int
    first_tokens: list[int]
    logprobs: list[TokenLogprob | None] = []
    finish_reasons: list[str | None] = []
    hidden: list[float] | None = None  # final hidden state of the last prompt token (predictor probe)
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. scored (params.prompt_logprobs)
    num_cached_tokens: int = 0  # leading prompt tokens whose KV came from the prefix cache


# ---- front -> worker ------------------------------------------------------------------


class ChunkPlan(_Msg):
    """One fixed-size chunk for a prefill worker: run it in one forward pass."""

    chunk_id: int
    pieces: list[PlanPiece]


class Handoff(_Msg):
    """Tell a decode worker to take over a prefilled request: copy `block_ids` from worker
    `src_worker`'s pool when its admission allows (with prefix caching, only those after the
    leading blocks it caches already), ack with KVCopied, then decode."""

    req_id: str
    src_worker: int
    block_ids: list[int]
    prompt_token_ids: list[int]
    params: SamplingParams
    first_tokens: list[int]
    open_choices: list[int]
    predicted_output_tokens: int | None = None
    arrival_s: float = 0.0
    priority: int = 0
    prior_output_tokens: int = 0
    """As in `NewReq`: the prompt's last this-many tokens are earlier outputs."""


class Release(_Msg):
    """Prefill side: the request's blocks are no longer needed (copied, or abandoned)."""

    req_id: str


class Abort(_Msg):
    """Drop the request (or only `choice`) and free every block it holds."""

    req_id: str
    choice: int | None = None


class SubmitMixed(_Msg):
    """Colocated mode: a mixed worker prefills and decodes the request itself."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float = 0.0
    priority: int = 0
    prior_output_tokens: int = 0
    """As in `NewReq`: the prompt's last this-many tokens are earlier outputs."""


class SetRole(_Msg):
    role: str


class Shutdown(_Msg):
    pass


class PeerPools(_Msg):
    """Every worker's KV pool, so decode workers can copy from prefill pools (sent once all
    workers are ready, and again after a restart)."""

    pools: dict[int, PoolInfo]


ToWorker = Union[ChunkPlan, Handoff, Release, Abort, SubmitMixed, SetRole, Shutdown, PeerPools]


# ---- worker -> front ------------------------------------------------------------------


class Ready(_Msg):
    worker_id: int
    pid: int
    role: str
    device: str
    pool: PoolInfo
    max_model_len: int
    eos_token_ids: list[int]


class ChunkDone(_Msg):
    worker_id: int
    chunk_id: int
    finished: list[PrefillResult] = []
    failed: list[str] = []  # req ids whose pieces could not run (e.g. aborted meanwhile)
    partial: bool = False
    """Only a leading part of the chunk ran (the rest did not fit the pool yet); another
    ChunkDone with the same chunk_id follows. The front counts the chunk done only then."""
    evicted_hashes: list[bytes] = []  # prefix-cache block hashes evicted since the last ChunkDone


class KVCopied(_Msg):
    """Decode worker: the request's KV is in our pool; the prefill side may free its copy."""

    worker_id: int
    req_id: str
    num_bytes: int
    seconds: float
    path: str = ""  # the transfer path the copy took (kv_transfer.PATHS)
    evicted_hashes: list[bytes] = []  # decode-side prefix-cache block hashes evicted since the last report


class Dropped(_Msg):
    """Decode worker: after an Abort, we hold nothing of the request and read nothing of it."""

    worker_id: int
    req_id: str


class TokenBatch(_Msg):
    """One decode step's new tokens, column-oriented: entry i belongs to (req_ids[i], choices[i])."""

    worker_id: int
    req_ids: list[str]
    choices: list[int]
    token_ids: list[int]
    finish_reasons: list[str | None]
    logprobs: list[TokenLogprob | None] = []
    prompt_logprobs: list[list[TokenLogprob] | None] = []
    """Mixed workers: entry i holds request req_ids[i]'s prompt logprobs on its first token."""
    evicted_hashes: list[bytes] = []
    """Decode workers: prefix-cache block hashes evicted since the last report (as on KVCopied)."""


class WorkerError(_Msg):
    worker_id: int
    message: str
    req_id: str | None = None


class PeerPaths(_Msg):
    """Decode worker, after each PeerPools: the KV transfer path it opened to each peer pool
    (`none`: no path; `errors`: why better paths were not taken)."""

    worker_id: int
    paths: dict[int, str]
    errors: dict[int, str] = {}


FromWorker = Union[Ready, ChunkDone, KVCopied, Dropped, TokenBatch, WorkerError, PeerPaths]

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_or_none(decoder: msgspec.msgpack.Decoder, raw: bytes):
    """Decode a message, or None when it is malformed in any way. msgspec raises DecodeError
    for most bad input but UnicodeDecodeError or RecursionError for some: a hostile or
    corrupted message must never take a process down."""
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError, TypeError, OverflowError):
        return None
