"""Benchmark workloads: request lengths from real traces or synthetic mixes, plus arrival times.

A workload is a list of `Request(prompt_tokens, output_tokens, arrival_s)`, sorted by
`arrival_s`. `arrival_s` is seconds from the start of the run (first request at 0), or
None for a closed loop / a trace without timestamps.

Sources (all read in place from the shared folder, never copied):
- Azure LLM 2023 conversation CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`): arrivals are the
  timestamps in seconds from the first row.
- Mooncake FAST'25 JSONL (`timestamp` in ms, `input_length`, `output_length`).
- Length-stats CSVs (`num_prefill_tokens,num_decode_tokens,...`): lengths only.
- TetriInfer classes (`lpld`, `lphd`, `hpld`, `hphd`, `mixed`): lengths drawn with a seeded
  numpy RNG from a pool made of the Azure 2023 conversation trace plus the ShareGPT-8K length
  stats (`length_stats/sharegpt_8k_filtered_stats_llama2_tokenizer.csv`); every row of both
  files is one pool entry, so the pool is weighted by row count (19,366 Azure + 30,731 ShareGPT).
  Light prompt = at most 512 tokens, light decode = at most 128 output tokens (heavy: above).
  `mixed` draws an equal number of requests from each of the four classes, then shuffles.
- `random`: prompt and output lengths uniform in RANDOM_PROMPT_RANGE_TOKENS / RANDOM_OUTPUT_RANGE_TOKENS
  (upper bounds lowered to --max-*-tokens when given).

Order of length transforms: class selection on the trace lengths, then `length_scale`
(round, at least 1 token), then clipping to the maxima.

Multi-turn chat (`load_chat_conversations`, `chat_messages`): conversations of real text from
the AlpacaEval records in ../shared/datasets (read in place); turn t sends the whole history,
every earlier instruction with its answer, then instruction t. The answers are either the ones
the served model gave in the earlier turns (history "served", what a chat client resends) or
the dataset's own (history "dataset", text no server computed).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import numpy as np

PROMPT_CUTOFF_TOKENS = 512  # light prefill: prompt_tokens <= this
OUTPUT_CUTOFF_TOKENS = 128  # light decode: output_tokens <= this
CLASS_NAMES = ("lpld", "lphd", "hpld", "hphd")
WORKLOAD_NAMES = (*CLASS_NAMES, "mixed", "random")
RANDOM_PROMPT_RANGE_TOKENS = (16, 1024)
RANDOM_OUTPUT_RANGE_TOKENS = (16, 256)

AZURE_CONV_RELPATH = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
MOONCAKE_RELPATH = "mooncake_fast25/synthetic_trace.jsonl"
SHAREGPT_RELPATH = "length_stats/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
POOL_RELPATHS = (AZURE_CONV_RELPATH, SHAREGPT_RELPATH)

_REPO_ROOT = Path(__file__).resolve().parents[2]

CHAT_DATASET_RELPATH = "alpaca_eval/model_outputs/gpt4_0314.json"
CHAT_HISTORY_MODES = ("served", "dataset")


class Request(msgspec.Struct, frozen=True):
    """One request to send: lengths in tokens, arrival in seconds from the run start (None: no timing)."""

    prompt_tokens: int
    output_tokens: int
    arrival_s: float | None = None
    hash_ids: tuple[int, ...] = ()
    """Mooncake traces: one prefix-block id per 512 prompt tokens (equal ids: a shared prefix)."""


# ---------------------------------------------------------------- locating files


def default_traces_dir() -> Path | None:
    """The shared traces folder: $TETRI_TRACES_DIR, else ../shared/traces beside cwd or the repo root."""
    candidates = []
    if os.environ.get("TETRI_TRACES_DIR"):
        candidates.append(Path(os.environ["TETRI_TRACES_DIR"]))
    candidates += [Path.cwd().parent / "shared" / "traces", _REPO_ROOT.parent / "shared" / "traces",
                   Path.cwd() / "shared" / "traces"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    return None


def default_datasets_dir() -> Path | None:
    """The shared datasets folder: $TETRI_DATASETS_DIR, else ../shared/datasets beside cwd or the repo root."""
    candidates = [Path(os.environ["TETRI_DATASETS_DIR"])] if os.environ.get("TETRI_DATASETS_DIR") else []
    candidates += [Path.cwd().parent / "shared" / "datasets", _REPO_ROOT.parent / "shared" / "datasets"]
    return next((path.resolve() for path in candidates if path.is_dir()), None)


def resolve_trace_path(path: str | os.PathLike, traces_dir: Path | None = None) -> Path:
    """Find a trace file: as given (relative to cwd), then relative to the repo root, then the traces dir."""
    given = Path(path).expanduser()
    candidates = [given]
    if not given.is_absolute():
        candidates.append(_REPO_ROOT / given)
        base = traces_dir or default_traces_dir()
        if base is not None:
            candidates.append(base / given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"trace file not found: {path} (tried {', '.join(str(c) for c in candidates)})")


# ---------------------------------------------------------------- trace loaders


def _parse_azure_time(text: str) -> tuple[int, float]:
    """'2023-11-16 18:15:46.6805900' -> (whole POSIX seconds, fraction); datetime takes only 6 decimals."""
    main, _, frac = text.strip().partition(".")
    whole = datetime.strptime(main, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return int(whole), float("0." + frac) if frac else 0.0


def load_azure_csv(path: str | os.PathLike) -> list[Request]:
    """Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens); arrivals from the first row."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append((_parse_azure_time(row["TIMESTAMP"]), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"])))
    if not rows:
        return []
    t0_whole, t0_frac = min(r[0] for r in rows)
    reqs = [Request(p, o, (whole - t0_whole) + (frac - t0_frac)) for (whole, frac), p, o in rows]
    return sorted(reqs, key=lambda r: r.arrival_s)


def load_mooncake_jsonl(path: str | os.PathLike) -> list[Request]:
    """Mooncake-style JSONL: timestamp (ms), input_length, output_length, hash_ids (the
    simulator's prefix caching reads them; the load generator sends random ids)."""
    reqs = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            ts_ms = obj.get("timestamp")
            reqs.append(Request(int(obj["input_length"]), int(obj["output_length"]),
                                None if ts_ms is None else float(ts_ms) / 1000.0,
                                tuple(int(h) for h in obj.get("hash_ids") or ())))
    if reqs and all(r.arrival_s is not None for r in reqs):
        t0 = min(r.arrival_s for r in reqs)
        reqs = sorted((Request(r.prompt_tokens, r.output_tokens, r.arrival_s - t0, r.hash_ids) for r in reqs),
                      key=lambda r: r.arrival_s)
    return reqs


def load_length_stats_csv(path: str | os.PathLike) -> list[Request]:
    """Length-stats CSV (num_prefill_tokens, num_decode_tokens, ...): no timestamps."""
    with open(path, newline="") as f:
        return [Request(int(float(row["num_prefill_tokens"])), int(float(row["num_decode_tokens"])))
                for row in csv.DictReader(f)]


def load_trace(path: str | os.PathLike) -> list[Request]:
    """Load any supported trace, choosing the parser from the extension and header."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return load_mooncake_jsonl(path)
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if "TIMESTAMP" in header and "ContextTokens" in header:
        return load_azure_csv(path)
    if "num_prefill_tokens" in header:
        return load_length_stats_csv(path)
    raise ValueError(f"unrecognised trace format: {path} (header {header})")


# ---------------------------------------------------------------- TetriInfer classes


def classify(prompt_tokens: int, output_tokens: int) -> str:
    """TetriInfer class with our cut-offs: light prompt <= 512 tokens, light decode <= 128 tokens."""
    prefill = "lp" if prompt_tokens <= PROMPT_CUTOFF_TOKENS else "hp"
    decode = "ld" if output_tokens <= OUTPUT_CUTOFF_TOKENS else "hd"
    return prefill + decode


def build_class_pool(traces_dir: Path | None = None) -> dict[str, np.ndarray]:
    """(n, 2) int arrays of (prompt_tokens, output_tokens) per class, from Azure conv + ShareGPT-8K."""
    base = traces_dir or default_traces_dir()
    if base is None:
        raise FileNotFoundError("shared traces folder not found; pass --trace-dir or set TETRI_TRACES_DIR")
    lengths = []
    for rel in POOL_RELPATHS:
        lengths += [(r.prompt_tokens, r.output_tokens) for r in load_trace(Path(base) / rel)]
    arr = np.asarray(lengths, dtype=np.int64)
    light_p = arr[:, 0] <= PROMPT_CUTOFF_TOKENS
    light_d = arr[:, 1] <= OUTPUT_CUTOFF_TOKENS
    masks = {"lpld": light_p & light_d, "lphd": light_p & ~light_d,
             "hpld": ~light_p & light_d, "hphd": ~light_p & ~light_d}
    return {name: arr[mask] for name, mask in masks.items()}


def sample_workload(name: str, num_requests: int, rng: np.random.Generator,
                    pool: dict[str, np.ndarray] | None = None,
                    max_prompt_tokens: int | None = None,
                    max_output_tokens: int | None = None) -> list[Request]:
    """Synthetic lengths for a named workload (no arrival times)."""
    if name == "random":
        lo_p, hi_p = RANDOM_PROMPT_RANGE_TOKENS
        lo_o, hi_o = RANDOM_OUTPUT_RANGE_TOKENS
        hi_p = min(hi_p, max_prompt_tokens or hi_p)
        hi_o = min(hi_o, max_output_tokens or hi_o)
        prompts = rng.integers(min(lo_p, hi_p), hi_p + 1, size=num_requests)
        outputs = rng.integers(min(lo_o, hi_o), hi_o + 1, size=num_requests)
        return [Request(int(p), int(o)) for p, o in zip(prompts, outputs)]
    if name not in CLASS_NAMES and name != "mixed":
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    pool = pool if pool is not None else build_class_pool()
    if name == "mixed":
        counts = np.full(len(CLASS_NAMES), num_requests // len(CLASS_NAMES))
        counts[rng.permutation(len(CLASS_NAMES))[: num_requests % len(CLASS_NAMES)]] += 1
        labels = np.repeat(np.arange(len(CLASS_NAMES)), counts)
        rng.shuffle(labels)
    else:
        labels = np.full(num_requests, CLASS_NAMES.index(name))
    out = []
    for label in labels:
        rows = pool[CLASS_NAMES[label]]
        if len(rows) == 0:
            raise ValueError(f"class {CLASS_NAMES[label]} is empty in the pool")
        p, o = rows[rng.integers(len(rows))]
        out.append(Request(int(p), int(o)))
    return out


# ---------------------------------------------------------------- transforms and arrivals


def scale_lengths(requests: list[Request], length_scale: float = 1.0,
                  max_prompt_tokens: int | None = None,
                  max_output_tokens: int | None = None) -> list[Request]:
    """Multiply both lengths by `length_scale` (rounded, >= 1 token), then clip to the maxima."""
    out = []
    for r in requests:
        p = max(1, round(r.prompt_tokens * length_scale))
        o = max(1, round(r.output_tokens * length_scale))
        if max_prompt_tokens is not None:
            p = min(p, max_prompt_tokens)
        if max_output_tokens is not None:
            o = min(o, max_output_tokens)
        # Prefix ids stay meaningful only for unscaled lengths (clipping keeps the leading ones).
        hashes = r.hash_ids[:-(-p // 512)] if length_scale == 1.0 else ()
        out.append(Request(p, o, r.arrival_s, hashes))
    return out


def poisson_arrivals_s(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Poisson process at `rate` req/s, first arrival at 0; rate=inf sends everything at 0."""
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("rate must be > 0")
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return [float(x) for x in np.cumsum(gaps)]


def with_arrivals(requests: list[Request], arrivals_s: list[float | None]) -> list[Request]:
    return [Request(r.prompt_tokens, r.output_tokens, a, r.hash_ids) for r, a in zip(requests, arrivals_s)]


def select_requests(requests: list[Request], num_requests: int, rng: np.random.Generator) -> list[Request]:
    """First N of a timed trace (keeps its burstiness); a seeded sample of an untimed one."""
    if all(r.arrival_s is not None for r in requests) and requests:
        return list(requests[:num_requests])
    if num_requests >= len(requests):
        idx = rng.permutation(len(requests))
    else:
        idx = np.sort(rng.choice(len(requests), size=num_requests, replace=False))
    return [requests[i] for i in idx]


def build_workload(*, trace: str | None = None, workload: str | None = None, num_requests: int = 100,
                   rate: float | None = None, time_scale: float | None = None,
                   concurrency: int | None = None, length_scale: float = 1.0,
                   max_prompt_tokens: int | None = None, max_output_tokens: int | None = None,
                   duration_s: float | None = None, seed: int = 0,
                   traces_dir: Path | None = None) -> list[Request]:
    """The full request list for a run, sorted by arrival.

    Arrival modes (at most one): `rate` (Poisson; inf = all at once), `time_scale` (trace
    timestamps / T; T > 1 replays faster), `concurrency` (closed loop: arrival_s None).
    With none given: a timed trace replays at its own pace, anything else is sent all at once.
    `duration_s` drops requests that would arrive after it (open loop).
    """
    if (trace is None) == (workload is None):
        raise ValueError("give exactly one of trace / workload")
    if sum(x is not None for x in (rate, time_scale, concurrency)) > 1:
        raise ValueError("give at most one of rate / time_scale / concurrency")
    if num_requests < 1:
        raise ValueError("num_requests must be >= 1")
    rng = np.random.default_rng(seed)
    if trace is not None:
        reqs = select_requests(load_trace(resolve_trace_path(trace, traces_dir)), num_requests, rng)
    else:
        pool = None if workload == "random" else build_class_pool(traces_dir)
        reqs = sample_workload(workload, num_requests, rng, pool, max_prompt_tokens, max_output_tokens)
    reqs = scale_lengths(reqs, length_scale, max_prompt_tokens, max_output_tokens)
    timed = bool(reqs) and all(r.arrival_s is not None for r in reqs)
    if concurrency is not None:
        reqs = with_arrivals(reqs, [None] * len(reqs))
    elif rate is not None:
        reqs = with_arrivals(reqs, poisson_arrivals_s(len(reqs), rate, rng))
    elif time_scale is not None or timed:
        if not timed:
            raise ValueError("--time-scale needs a trace with timestamps (Azure or Mooncake)")
        scale = time_scale if time_scale is not None else 1.0
        if scale <= 0:
            raise ValueError("time_scale must be > 0")
        t0 = reqs[0].arrival_s
        reqs = with_arrivals(reqs, [(r.arrival_s - t0) / scale for r in reqs])
    else:
        reqs = with_arrivals(reqs, [0.0] * len(reqs))
    if duration_s is not None and concurrency is None:
        reqs = [r for r in reqs if r.arrival_s <= duration_s]
    return reqs


# ---------------------------------------------------------------- multi-turn chat


class ChatTurn(msgspec.Struct, frozen=True):
    """One turn of a conversation: the user's instruction and the dataset's answer to it."""

    instruction: str
    dataset_answer: str


def load_chat_conversations(path: str | os.PathLike | None = None, num_conversations: int = 8, turns: int = 4,
                            seed: int = 0, answer_chars: int | None = None) -> list[list[ChatTurn]]:
    """`num_conversations` conversations of `turns` turns each from an AlpacaEval model-outputs
    file (default: CHAT_DATASET_RELPATH in the shared datasets folder): after a seeded shuffle of
    its records, conversation c takes records [c * turns, (c + 1) * turns), in order.
    `answer_chars` cuts each dataset answer to that many characters."""
    if path is None:
        base = default_datasets_dir()
        if base is None:
            raise FileNotFoundError("shared datasets folder not found; set TETRI_DATASETS_DIR")
        path = base / CHAT_DATASET_RELPATH
    if num_conversations < 1 or turns < 1:
        raise ValueError("num_conversations and turns must be >= 1")
    records = json.loads(Path(path).read_text())
    if num_conversations * turns > len(records):
        raise ValueError(f"{Path(path).name} has {len(records)} records, fewer than {num_conversations} x {turns}")
    random.Random(seed).shuffle(records)
    turns_of = [ChatTurn(r["instruction"], r["output"][:answer_chars]) for r in records]
    return [turns_of[c * turns:(c + 1) * turns] for c in range(num_conversations)]


def chat_messages(conversation: list[ChatTurn], turn: int, answers: list[str] | None = None) -> list[dict]:
    """Turn `turn`'s messages (0-based): every earlier turn's instruction and answer, then its own
    instruction. `answers`: what the served model answered in turns 0..turn-1 (history
    "served"); None: the dataset's answers (history "dataset")."""
    if not 0 <= turn < len(conversation):
        raise ValueError(f"turn {turn} outside a {len(conversation)}-turn conversation")
    if answers is not None and len(answers) < turn:
        raise ValueError(f"turn {turn} needs the answers to {turn} earlier turns, got {len(answers)}")
    msgs: list[dict] = []
    for t, rec in enumerate(conversation[:turn]):
        answer = rec.dataset_answer if answers is None else answers[t]
        msgs += [{"role": "user", "content": rec.instruction}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": conversation[turn].instruction}]
