"""The Triton tests. Without CUDA the kernels run under the Triton interpreter on CPU tensors:
TRITON_INTERPRET=1 must be in the environment before `tetri.workers.triton_attn` (which
decorates the kernels) is imported, so it is set here, when this folder is collected and
before any of its test modules is imported. Nothing else in the suite imports triton (the
torch backend is the CPU path), so the setting changes no other test. With CUDA (the GPU
check) the same tests run the compiled kernels on the GPU."""

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA:
    if "tetri.workers.triton_attn" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tetri.workers.triton_attn was imported before TRITON_INTERPRET=1 was set")
    os.environ["TRITON_INTERPRET"] = "1"
