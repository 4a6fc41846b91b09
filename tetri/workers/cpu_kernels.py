"""Two fp32 CPU kernels for AVX2/FMA (`cpu_kernels.c`), compiled on first use.

Why: on CPU a decode step is two thirds linear layers and a quarter attention, and the
library kernels leave much of the machine idle there. Measured side by side on 2 cores:
- `linear`: oneDNN's brgemm ran 75-95 GFLOP/s at 16 rows, against 180 on large matrices.
  This GEMM keeps a 4-row x 24-column tile in registers over a weight packed into
  24-column panels: a Llama layer's shapes ran 1.3-1.6x faster than oneDNN's prepacked
  weight at 16 rows, 1.25-1.3x at 64, 1.1-1.2x at 512.
- `decode_attention`: SDPA read a decode batch's staged K/V at 12 GB/s (a plain streaming
  read reaches 22 here); one pass per (row, head) over the keys in place reads it at
  17-18 GB/s, 1.45x faster, with no mask.

How: the C source ships with the package. The first process that needs it compiles it with
the system C compiler into the cache directory (named by a hash of the source and flags,
written atomically, so concurrent workers do not collide) and loads it with ctypes, which
releases the GIL for the call. Its OpenMP loop runs on the libgomp torch has already loaded
(same soname), so `torch.set_num_threads` governs it and no second thread pool competes.

`load()` returns None, and callers keep oneDNN and SDPA, where the CPU lacks AVX2/FMA, no
compiler is found, the build fails, or `TETRI_CPU_KERNELS=0`.

Whether they are used is measured, per machine (the ratios above are from one 2-core AVX2
box; on an AVX-512 Xeon oneDNN won): the first process that loads the kernels times each
against the library on fixed shapes, per class: GEMM by rows bucket (`GEMM_BUCKETS`) and
decode attention. It times one thread's CPU time (`time.thread_time`), best call of many,
alternating, so other processes on a shared machine (which steal wall time, not CPU time)
do not decide it; both sides parallelise the same way across threads, so the per-core
comparison carries over. A kernel is kept for a class only where it beats the library by
`MARGIN`. The result is cached beside the compiled library, keyed by the CPU model
(`calibration()`), so later workers read it. A `Linear` keeps the layouts its chosen classes
need (both when they disagree) and routes each call by its rows; `attention_applies` says
whether the decode attention kernel is the choice. `TETRI_CPU_KERNELS=force` skips the
measurement and uses the kernels everywhere.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tetri.workers.models.default_model import cache_root

log = logging.getLogger(__name__)

PANEL = 24
"""Output columns per packed panel (three 8-float AVX registers)."""
_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
_LIBS = ["-lm"]


def _cpu_supported() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # both imply FMA


def _build(compiler: list[str]) -> Path:
    command = [*compiler, *_FLAGS, *_LIBS]
    tag = hashlib.sha256(_SOURCE.read_bytes() + " ".join(command).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"cpu_kernels-{tag}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        subprocess.run([*compiler, *_FLAGS, str(_SOURCE), "-o", tmp, *_LIBS], check=True, capture_output=True,
                       timeout=120)
        os.replace(tmp, lib)  # atomic: a concurrent builder's copy is identical
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they do not apply (see the module docstring)."""
    if os.environ.get("TETRI_CPU_KERNELS", "1") == "0" or not _cpu_supported():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.warning("no C compiler found: CPU kernels fall back to oneDNN and SDPA")
        return None
    try:
        lib = ctypes.CDLL(str(_build(shlex.split(compiler))))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("building the CPU kernels failed (%s %s): falling back to oneDNN and SDPA", exc,
                    detail.decode(errors="replace")[-500:])
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.tetri_gemm_f32.argtypes = [p, i64, i64, i64, p, i64, p, p]
    lib.tetri_gemm_f32.restype = None
    lib.tetri_decode_attn_f32.argtypes = [p, p, p, i64, i64, p, p, i64, i64, i64, i64, ctypes.c_float]
    lib.tetri_decode_attn_f32.restype = None
    return lib


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`[out, in]` weight -> panels `[ceil(out / 24), in, 24]`, zero padded past `out`
    (written in place: no padded temporary beside a large lm_head)."""
    out_features, in_features = weight.shape
    full = out_features // PANEL
    panels = torch.empty(-(-out_features // PANEL), in_features, PANEL, dtype=torch.float32)
    panels[:full].copy_(weight[:full * PANEL].reshape(full, PANEL, in_features).transpose(1, 2))
    if full < panels.shape[0]:
        tail = out_features - full * PANEL
        panels[full].zero_()
        panels[full, :, :tail].copy_(weight[full * PANEL:].t())
    return panels


def linear(lib: ctypes.CDLL, x: torch.Tensor, panels: torch.Tensor, out_features: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """`x W^T (+ bias)` for fp32 `x` of shape `[..., in]` over `pack(W)`."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.dtype != torch.float32:
        x2 = x2.contiguous().float()
    rows, in_features = x2.shape
    y = torch.empty(rows, out_features, dtype=torch.float32)
    if rows:
        lib.tetri_gemm_f32(x2.data_ptr(), rows, in_features, x2.stride(0), panels.data_ptr(), out_features,
                           y.data_ptr(), None if bias is None else bias.data_ptr())
    return y.view(*lead, out_features)


def attention_handles(kv: torch.Tensor) -> bool:
    """`decode_attention` handles K/V laid out like `kv` (`[..., head_dim]`): CPU fp32, a
    head_dim that is a multiple of 8 up to 512."""
    head_dim = kv.shape[-1]
    return kv.is_cpu and kv.dtype == torch.float32 and head_dim % 8 == 0 and head_dim <= 512


def attention_applies(kv: torch.Tensor) -> bool:
    """Decode attention over K/V like `kv` should use `decode_attention`: it handles them, the
    kernels build here, and the calibration chose it over SDPA on this machine."""
    if not attention_handles(kv) or load() is None:
        return False
    cal = calibration()
    return cal is None or cal.attention == KERNEL


def decode_attention(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Each row's one query `q[rows, heads, D]` over the first `lens[row]` (int64) keys of
    `k, v[rows, kv_heads, >= max(lens), D]`, views whose keys are contiguous per (row, head)."""
    rows, heads, head_dim = q.shape
    assert heads % k.shape[1] == 0 and q.dtype == k.dtype == torch.float32
    assert k.stride() == v.stride() and k.stride(2) == head_dim and k.stride(3) == 1
    assert lens.dtype == torch.int64 and lens.is_contiguous() and lens.numel() == rows
    q = q.contiguous()
    out = torch.empty_like(q)
    lib.tetri_decode_attn_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), lens.data_ptr(),
                              out.data_ptr(), rows, heads, heads // k.shape[1], head_dim, scale)
    return out


# ---- per-machine calibration: keep a kernel only where it beats the library here ----------

KERNEL, LIBRARY = "kernel", "library"
GEMM_BUCKETS = (1, 8, 32, 128)
"""Rows classes of a GEMM: [1, 8), [8, 32), [32, 128), [128, inf) (decode batches to prefill chunks)."""
_PROBE_ROWS = (4, 16, 64, 192)
_GEMM_SHAPES = ((768, 768), (768, 2048))  # (in, out): attention-like and MLP-like layers
_ATTN_SHAPE = (16, 8, 4, 64, 256)  # rows, heads, kv heads, head_dim, keys
MARGIN = 0.05
"""A kernel must be at least this much faster (by its best call) to be kept."""
MAX_TRIALS, MIN_TRIALS, BUDGET_S = 25, 5, 0.04


@dataclass(frozen=True)
class Calibration:
    gemm: dict[str, str]
    """Rows-bucket lower bound (as a string) -> KERNEL or LIBRARY."""
    attention: str
    seconds: dict[str, dict[str, float]]
    """What was measured: class -> best CPU seconds of one call of KERNEL and of LIBRARY."""
    cpu: str

    def gemm_choice(self, rows: int) -> str:
        bound = max((b for b in GEMM_BUCKETS if rows >= b), default=GEMM_BUCKETS[0])
        return self.gemm.get(str(bound), LIBRARY)

    @property
    def gemm_choices(self) -> set[str]:
        return set(self.gemm.values())


def choose(seconds: dict[str, dict[str, float]], margin: float = MARGIN) -> dict[str, str]:
    """Per class, KERNEL when its best time is below (1 - margin) x the library's, else LIBRARY."""
    return {cls: KERNEL if t[KERNEL] < (1.0 - margin) * t[LIBRARY] else LIBRARY for cls, t in seconds.items()}


def best_seconds(candidates: dict[str, Callable[[], object]], timer: Callable[[], float] = time.thread_time,
                 budget_s: float = BUDGET_S) -> dict[str, float]:
    """Best time of one call of each candidate, over calls that alternate between them
    (drift hits every candidate alike): as many as fit in about `budget_s` each, between
    MIN_TRIALS and MAX_TRIALS."""
    best = {}
    for name, fn in candidates.items():  # warm up (first-call allocations), and size the run
        t0 = timer()
        fn()
        best[name] = timer() - t0
    trials = max(MIN_TRIALS, min(MAX_TRIALS, int(budget_s / max(max(best.values()), 1e-9))))
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(trials):
        for name, fn in candidates.items():
            t0 = timer()
            fn()
            best[name] = min(best[name], timer() - t0)
    return best


def _gemm_candidates(lib: ctypes.CDLL, rows: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(rows)
    layers = []
    for in_f, out_f in _GEMM_SHAPES:
        w = torch.randn(out_f, in_f, generator=g)
        try:  # the library path a Linear takes: oneDNN's prepacked weight, else F.linear
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 16) if torch.backends.mkldnn.is_available() else None
        except (RuntimeError, AttributeError):
            packed = None
        layers.append((pack(w), w, packed, out_f, torch.randn(rows, in_f, generator=g)))

    def kernel():
        for panels, _, _, out_f, x in layers:
            linear(lib, x, panels, out_f, None)

    def library():
        for _, w, packed, _, x in layers:
            if packed is None:
                F.linear(x, w)
            else:
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    return {KERNEL: kernel, LIBRARY: library}


def _attention_candidates(lib: ctypes.CDLL) -> dict[str, Callable[[], object]]:
    """The staged decode attention (see decode_stage.py): the kernel, or SDPA with a mask."""
    rows, heads, kv_heads, head_dim, keys = _ATTN_SHAPE
    g = torch.Generator().manual_seed(0)
    stage = torch.randn(rows, 2, kv_heads, keys + 16, head_dim, generator=g)  # staged K/V with spare room
    k, v = stage[:, 0, :, :keys], stage[:, 1, :, :keys]
    q = torch.randn(rows, heads, head_dim, generator=g)
    lens = torch.randint(keys // 2, keys + 1, (rows,), generator=g)
    mask = (torch.arange(keys)[None, :] < lens[:, None])[:, None, None, :]
    scale = head_dim ** -0.5
    return {KERNEL: lambda: decode_attention(lib, q, k, v, lens, scale),
            LIBRARY: lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=True)}


def measure(lib: ctypes.CDLL, timer: Callable[[], float] = time.thread_time) -> dict[str, dict[str, float]]:
    """Best CPU seconds of kernel and library per class ("gemm:<bucket>", "attention"), on
    one thread (see the module docstring); about a second in all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = {f"gemm:{b}": best_seconds(_gemm_candidates(lib, rows), timer)
                   for b, rows in zip(GEMM_BUCKETS, _PROBE_ROWS)}
            out["attention"] = best_seconds(_attention_candidates(lib), timer)
    finally:
        torch.set_num_threads(threads)
    return out


def cpu_name() -> str:
    """The CPU model and what torch dispatches on it (calibrations do not travel between CPUs)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} {torch.backends.cpu.get_cpu_capability()}"


def calibration_path(lib_path: str | Path, cpu: str) -> Path:
    tag = hashlib.sha256(cpu.encode()).hexdigest()[:12]
    lib_path = Path(lib_path)
    return lib_path.with_name(f"{lib_path.stem}-calibration-{tag}.json")


def calibrate(lib_path: str | Path, measure_fn: Callable[[], dict[str, dict[str, float]]], cpu: str) -> Calibration:
    """The cached calibration for (library, CPU), measured and written (atomically, under a
    lock, so concurrent workers measure once) when there is none or it is unreadable."""
    path = calibration_path(lib_path, cpu)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return Calibration(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass
        seconds = measure_fn()
        chosen = choose(seconds)
        cal = Calibration(gemm={k.split(":", 1)[1]: v for k, v in chosen.items() if k.startswith("gemm:")},
                          attention=chosen["attention"], seconds=seconds, cpu=cpu)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(cal), f, indent=1)
        os.replace(tmp, path)
    log.info("CPU kernels calibrated on %s: gemm by rows bucket %s, attention %s (%s)", cpu, cal.gemm,
             cal.attention, path)
    return cal


@functools.cache
def calibration() -> Calibration | None:
    """This machine's choices (see the module docstring); None where the kernels do not load
    or `TETRI_CPU_KERNELS=force` (kernels everywhere). Measured at the first use on this
    CPU, then read from the cache."""
    lib = load()
    if lib is None or os.environ.get("TETRI_CPU_KERNELS") == "force":
        return None
    return calibrate(lib._name, lambda: measure(lib), cpu_name())


def gemm_layouts() -> set[str]:
    """Which packed layouts a CPU fp32 `Linear` needs here: KERNEL (panels) and/or LIBRARY
    (oneDNN); empty when the kernels do not load."""
    if load() is None:
        return set()
    cal = calibration()
    return {KERNEL} if cal is None else cal.gemm_choices


def gemm_uses_kernel(rows: int) -> bool:
    cal = calibration()
    return cal is None or cal.gemm_choice(rows) == KERNEL
