"""The engine's CUDA figures against what the same GPU measures it can do, in one run.

    python tools/gpu_bench.py --json out.json    # on the GPU machine (tools/gpu_check.sh runs it)
    python tools/gpu_bench.py --cpu-smoke        # every section that can run on CPU, tiny sizes

Sections (each prints one line per case; `--json` also writes them all):
- copy: device-to-device copy bandwidth, (read + write bytes) / time, the HBM roofline's rate;
- matmul: bf16 GEMM peak (fp32 on CPU);
- decode: step time and tokens/s at batch 1, 16, 64, 256 with contexts spread over 1-4k,
  against the roofline (weight + KV bytes read per step) / copy bandwidth;
- prefill: TFLOP/s for chunks of 512, 1024, 2048 tokens against the matmul peak;
- graphs: decode step replayed from CUDA graphs against the same step run eagerly
  (`--enforce-eager`'s path), batch 1 and 16;
- kernel: the Triton decode kernel alone on one layer, KV bytes/s against the copy bandwidth.
The model is a Llama-3-8B-shaped checkpoint of random bf16 weights written from a config
(no download) and loaded by the engine's own loader. With `--cpu-smoke` the model is tiny,
the kernels run under the Triton interpreter and the graphs section reports the eager path only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if "--cpu-smoke" in sys.argv:  # CPU tensors: the Triton kernels run under the interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024, rope_theta=10000.0,
            rms_norm_eps=1e-6)


class Sizes:
    def __init__(self, smoke: bool) -> None:
        self.copy_bytes = 64 << 20 if smoke else 4 << 30
        self.gemm = 256 if smoke else 8192
        self.decode_batches = [1, 4] if smoke else [1, 16, 64, 256]
        self.context = (16, 64) if smoke else (1024, 4096)
        self.chunks = [32, 64] if smoke else [512, 1024, 2048]
        self.graph_batches = [1, 4] if smoke else [1, 16]
        self.kernel_batch, self.kernel_context = (4, 64) if smoke else (64, 4096)
        self.steps = 1 if smoke else 20
        self.config = TINY if smoke else LLAMA3_8B
        self.dtype = torch.float32 if smoke else torch.bfloat16


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after two warm-up runs (one for a single
    repeat), timed with CUDA events on the GPU."""
    for _ in range(min(2, repeats)):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeats)


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats)


def write_checkpoint(out: str, config: dict, dtype: torch.dtype, device: torch.device) -> None:
    """A Llama checkpoint of random weights (shards of <= 4 GiB), from `config` alone."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(**config, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
              "model.norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    gen = torch.Generator(device=device).manual_seed(0)
    shard, shard_bytes, weight_map, n = {}, 0, {}, 0
    for name, shape in list(shapes.items()) + [("", None)]:
        if shape is None or shard_bytes > 4 << 30:
            file = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(out, file))
            weight_map |= {k: file for k in shard}
            shard, shard_bytes, n = {}, 0, n + 1
        if shape is None:
            break
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen, device=device) * 0.02
        shard[name] = t.to(dtype).cpu()
        shard_bytes += shard[name].nbytes
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def kv_token_bytes(spec, dtype: torch.dtype) -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * torch.empty((), dtype=dtype).element_size()


def linear_params(spec) -> tuple[int, int]:
    """(parameters of one layer's linears, of the lm_head): what a step multiplies by."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_heads * spec.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size, h * spec.vocab_size


def weight_bytes(spec, dtype: torch.dtype) -> int:
    """Bytes a decode step reads of the weights: every linear and the lm_head (the embedding
    table gives one row per token; norms are negligible)."""
    layer, head = linear_params(spec)
    return (layer * spec.num_layers + head) * torch.empty((), dtype=dtype).element_size()


def decode_segments(ex, batch: int, context: tuple[int, int], tag: str):
    """`batch` decode rows with contexts spread evenly over `context`, blocks allocated."""
    from tetri.workers.model_runner import Segment

    lo, hi = context
    lens = [lo + (hi - lo) * i // max(1, batch - 1) for i in range(batch)] if batch > 1 else [(lo + hi) // 2]
    need = sum(-(-n // ex.block_size) for n in lens)
    if need > ex.blocks.num_free:
        raise MemoryError(f"batch {batch} needs {need} KV blocks, the pool has {ex.blocks.num_free} free")
    segs = []
    for i, n in enumerate(lens):
        blocks = ex.blocks.allocate(f"{tag}-{i}", -(-n // ex.block_size))
        segs.append(Segment([5], n - 1, blocks, True))
    return segs, lens


def free_all(ex, tag: str, count: int) -> None:
    for i in range(count):
        ex.blocks.free(f"{tag}-{i}")


def bench_decode(ex, sizes: Sizes, bandwidth: float, device) -> list[dict]:
    rows = []
    wbytes = weight_bytes(ex.loaded.spec, ex.loaded.dtype)
    for batch in sizes.decode_batches:
        segs, lens = decode_segments(ex, batch, sizes.context, "dec")
        step_s = timed(lambda: ex.runner.run(segs), device, sizes.steps)
        read = wbytes + sum(lens) * kv_token_bytes(ex.loaded.spec, ex.loaded.dtype)
        roof_s = read / bandwidth
        rows.append(dict(batch=batch, context=f"{min(lens)}-{max(lens)}", step_ms=step_s * 1e3,
                         tokens_per_s=batch / step_s, bytes_read=read, roofline_ms=roof_s * 1e3,
                         roofline_share=roof_s / step_s))
        free_all(ex, "dec", batch)
    return rows


def prefill_flops(spec, tokens: int) -> float:
    layer, head = linear_params(spec)
    dense = 2 * tokens * layer * spec.num_layers + 2 * head  # the lm_head for the one sampling row
    attention = 2 * spec.num_heads * spec.head_dim * tokens * tokens * spec.num_layers  # causal QK^T + PV
    return dense + attention


def bench_prefill(ex, sizes: Sizes, peak: float, device) -> list[dict]:
    from tetri.workers.model_runner import Segment

    rows = []
    for chunk in sizes.chunks:
        blocks = ex.blocks.allocate("pre", -(-chunk // ex.block_size))
        seg = [Segment([5 + i % 100 for i in range(chunk)], 0, blocks, True)]
        step_s = timed(lambda: ex.runner.run(seg), device, max(1, sizes.steps // 4))
        flops = prefill_flops(ex.loaded.spec, chunk)
        rows.append(dict(chunk=chunk, step_ms=step_s * 1e3, tflops=flops / step_s / 1e12,
                         peak_share=flops / step_s / peak))
        ex.blocks.free("pre")
    return rows


def bench_graphs(ex, sizes: Sizes, device) -> list[dict]:
    graphs = ex.runner.graphs
    rows = []
    for batch in sizes.graph_batches:
        segs, _ = decode_segments(ex, batch, sizes.context, "gr")
        captured = graphs.graphs
        graph_s = timed(lambda: ex.runner.run(segs), device, sizes.steps) if captured else None
        graphs.graphs = {}  # the same static step, run directly: --enforce-eager's path
        try:
            eager_s = timed(lambda: ex.runner.run(segs), device, sizes.steps)
        finally:
            graphs.graphs = captured
        rows.append(dict(batch=batch, eager_ms=eager_s * 1e3, graph_ms=graph_s * 1e3 if graph_s else None,
                         speedup=eager_s / graph_s if graph_s else None))
        free_all(ex, "gr", batch)
    return rows


def bench_kernel(ex, sizes: Sizes, bandwidth: float, device) -> dict:
    from tetri.workers import triton_attn

    spec, pool = ex.loaded.spec, ex.pool.data
    segs, lens = decode_segments(ex, sizes.kernel_batch, (sizes.kernel_context, sizes.kernel_context), "k")
    width = max(len(s.block_ids) for s in segs)
    tables = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in segs], device=device)
    ctx = torch.tensor(lens, device=device)
    q = torch.randn(len(segs), spec.num_heads, spec.head_dim, dtype=pool.dtype, device=device)
    out = torch.empty_like(q)
    splits = ex.runner.attn.num_splits(len(segs))
    kernel_s = timed(lambda: triton_attn.decode_attention(q, pool, 0, tables, ctx, spec.head_dim ** -0.5, out,
                                                          splits), device, sizes.steps)
    kv = sum(lens) * kv_token_bytes(spec, pool.dtype) // spec.num_layers
    free_all(ex, "k", len(segs))
    return dict(batch=len(segs), context=sizes.kernel_context, splits=splits, kernel_us=kernel_s * 1e6,
                bytes_per_s=kv / kernel_s, copy_share=kv / kernel_s / bandwidth)


def build_executor(model_dir: str, sizes: Sizes, device: str, smoke: bool):
    from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
    from tetri.workers.executor import Executor

    dtype = str(sizes.dtype).removeprefix("torch.")
    max_seqs = max(sizes.decode_batches)
    cache = CacheConfig(num_blocks=2048) if smoke else CacheConfig(gpu_memory_utilization=0.9)
    return Executor(ModelConfig(model=model_dir, dtype=dtype, device=device, attention="triton",
                                max_model_len=sizes.context[1] + 16),
                    cache, sched=EngineSchedConfig(chunk_size=max(sizes.chunks), max_num_seqs=max_seqs))


def run(smoke: bool, keep_dir: str | None, model_dir: str | None = None) -> dict:
    device_name = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    device = torch.device(device_name)
    sizes = Sizes(smoke)
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)
    bandwidth = copy_bandwidth(device, sizes.copy_bytes, 10)
    peak = matmul_peak(device, sizes.gemm, sizes.dtype, 10)
    report |= dict(copy_GBps=bandwidth / 1e9, matmul_TFLOPs=peak / 1e12)
    print(f"copy bandwidth (read+write): {bandwidth / 1e9:.1f} GB/s; {sizes.dtype} matmul {sizes.gemm}^3: "
          f"{peak / 1e12:.3g} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(dir=keep_dir) as tmp_dir:
        t0 = time.perf_counter()
        if model_dir is None:
            model_dir = tmp_dir
        if not os.path.exists(os.path.join(model_dir, "config.json")):  # --model-dir: written once, kept
            os.makedirs(model_dir, exist_ok=True)
            write_checkpoint(model_dir, sizes.config, sizes.dtype, device)
        ex = build_executor(model_dir, sizes, device_name, smoke)
        report["startup_s"] = time.perf_counter() - t0
        print(f"checkpoint written, loaded, pool sized ({ex.blocks.num_blocks} blocks), graphs captured: "
              f"{report['startup_s']:.1f} s", flush=True)
        for name, fn in (("decode", lambda: bench_decode(ex, sizes, bandwidth, device)),
                         ("prefill", lambda: bench_prefill(ex, sizes, peak, device)),
                         ("graphs", lambda: bench_graphs(ex, sizes, device)),
                         ("kernel", lambda: [bench_kernel(ex, sizes, bandwidth, device)])):
            try:
                report[name] = fn()
            except MemoryError as e:  # a pool too small for a case: say so, keep the other sections
                report[name] = [dict(error=str(e))]
            for row in report[name]:
                print(name, " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        ex.close()
    return report


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (the suite runs this)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--tmp", default=None, help="where the random checkpoint is written (default: $TMPDIR)")
    ap.add_argument("--model-dir", default=None,
                    help="write the random checkpoint here once and keep it (tools/gpu_serve_check.py reuses it)")
    args = ap.parse_args(argv)
    report = run(args.cpu_smoke, args.tmp, args.model_dir)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
