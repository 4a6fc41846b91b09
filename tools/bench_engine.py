"""Engine output tokens/s against Hugging Face `generate`, side by side in one run.

Same ~100M-parameter random Llama (hidden 768, 12 layers), batch B, 128-token prompts,
128 new tokens, greedy, ignore_eos, fp32, 2 threads. Runs alternate HF / tetri and keep
the best of `--repeats` each, so machine-load drift hits both sides alike. Prints the ratio
of the bests and, as a check on it, the ratio of the medians. `--fallback` also runs the
engine without its compiled CPU kernels (`TETRI_CPU_KERNELS=0`: oneDNN and SDPA) in the
same rotation and prints how much faster the kernels are.

    python tools/bench_engine.py --batch 16 64
    python tools/bench_engine.py --batch 16 --fallback
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def build_model(out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)


def bench_hf(model_dir: str, prompts: torch.Tensor, new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - prompts.shape[1] == new_tokens
    return prompts.shape[0] * new_tokens / elapsed


def bench_tetri(model_dir: str, prompts: torch.Tensor, new_tokens: int, chunk_size: int, kernels: bool = True) -> float:
    from tetri import LLM, SamplingParams
    from tetri.workers import cpu_kernels

    os.environ["TETRI_CPU_KERNELS"] = "1" if kernels else "0"
    cpu_kernels.load.cache_clear()

    llm = LLM(model_dir, dtype="float32", chunk_size=chunk_size, kv_cache_gb=2.0, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts.tolist(), params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    llm.close()
    return prompts.shape[0] * new_tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fallback", action="store_true", help="also run without the compiled CPU kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        build_model(d)
        head = f"{'batch':>6} {'hf tok/s':>10} {'tetri tok/s':>12} {'ratio':>7} {'median ratio':>13}"
        print(head + (f" {'fallback tok/s':>15} {'kernels/fallback':>17}" if args.fallback else ""))
        for b in args.batch:
            prompts = torch.randint(3, 32000, (b, args.prompt_tokens), generator=torch.Generator().manual_seed(b))
            hf, ours, fallback = [], [], []
            for _ in range(args.repeats):  # interleaved, best of N: load drift hits all alike
                hf.append(bench_hf(d, prompts, args.new_tokens))
                ours.append(bench_tetri(d, prompts, args.new_tokens, args.chunk_size))
                if args.fallback:
                    fallback.append(bench_tetri(d, prompts, args.new_tokens, args.chunk_size, kernels=False))
            line = (f"{b:>6} {max(hf):>10.1f} {max(ours):>12.1f} {max(ours) / max(hf):>6.2f}x "
                    f"{statistics.median(ours) / statistics.median(hf):>12.2f}x")
            if args.fallback:
                line += f" {max(fallback):>15.1f} {max(ours) / max(fallback):>16.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
