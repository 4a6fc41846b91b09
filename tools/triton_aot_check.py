"""Compile every Triton kernel variant the attention backend launches for a GPU target, on a
machine without a GPU (Triton's bundled ptxas), and print each one's registers, stack frame,
spill stores and shared memory. A compile-only check: it proves the kernels lower for sm_90 with this Triton,
not that they run or how fast (tools/gpu_check.sh does that on the GPU machine).

    python tools/triton_aot_check.py                 # sm_90 (H100/H200), every head dim, dtype, group
    python tools/triton_aot_check.py --arch 80 --quick

Launch parameters come from `triton_attn`'s `*_meta` functions, the ones the launchers use.
Exits non-zero if a variant fails to compile or spills registers (spill stores > 0).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels for the GPU")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tetri.workers import triton_attn as ta  # noqa: E402

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INT64_PTRS = ("tables_ptr", "ctx_ptr", "cu_ptr", "start_ptr", "slot_ptr")
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def signature(fn, meta: dict, dtype: str, mid_fp32: bool) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in meta:
            sig[name] = "constexpr"
        elif name in INT64_PTRS:
            sig[name] = "*i64"
        elif name.startswith("mid_"):
            sig[name] = "*fp32" if mid_fp32 else f"*{dtype}"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def compile_variant(fn, meta: dict, dtype: str, target: GPUTarget, mid_fp32: bool = True):
    consts = {k: v for k, v in meta.items() if k not in LAUNCH_OPTIONS}
    options = {k: v for k, v in meta.items() if k in LAUNCH_OPTIONS}
    src = ASTSource(fn, signature(fn, consts, dtype, mid_fp32), consts)
    return triton.compile(src, target=target, options=options)


def resource_usage(kernel, arch: int) -> tuple[int, int, int]:
    """(registers, stack frame bytes, spill store bytes) per thread: `ptxas -v` (the ptxas
    Triton itself uses for this arch) over the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr

    def field(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return field(r"Used (\d+) registers"), field(r"(\d+) bytes stack frame"), field(r"(\d+) bytes spill stores")


def variants(quick: bool):
    page = 16
    dims = (128,) if quick else (64, 80, 96, 128, 256)
    for dtype, head_dim in itertools.product(DTYPES, dims):
        name = DTYPES[dtype]
        for group in ((1, 4) if quick else (1, 2, 3, 4, 8)):
            heads, kv = 8 * group, 8
            for splits in (1, 4):
                yield (f"decode {name} d{head_dim} g{group} s{splits}", ta._decode_split_kernel,
                       ta.decode_meta(heads, kv, head_dim, page, splits, 256, dtype, False), name, splits > 1)
            yield (f"extend {name} d{head_dim} g{group}", ta._extend_kernel,
                   ta.extend_meta(heads, kv, head_dim, page, dtype, False), name, False)
        yield f"merge {name} d{head_dim}", ta._decode_merge_kernel, ta.merge_meta(head_dim, 4), name, True
        yield f"store {name} d{head_dim}", ta._store_kv_kernel, ta.store_meta(8 * head_dim, page, False), name, False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="head dim 128 and groups 1, 4 only")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    bad = 0
    for label, fn, meta, dtype, mid_fp32 in variants(args.quick):
        try:
            kernel = compile_variant(fn, meta, dtype, target, mid_fp32)
            regs, stack, spills = resource_usage(kernel, args.arch)
            verdict = "ok" if spills == 0 else "SPILLS"
            print(f"{label:32s} regs {regs:3d} stack {stack:4d} spill stores {spills:4d} "
                  f"smem {kernel.metadata.shared:6d}  {verdict}", flush=True)
            bad += spills != 0
        except Exception as e:  # a variant that does not lower
            print(f"{label:32s} FAILED: {e!r}"[:400], flush=True)
            bad += 1
    print("all variants compile without spills" if not bad else f"{bad} variants failed or spill")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
