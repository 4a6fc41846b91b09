"""Linear.pack(): both packed paths (`cpu_kernels.linear` over 24-column panels, and oneDNN's
prepacked weight) compute what `F.linear` does, at every batch size the engine runs (one decode row up
to a prefill chunk; the kernel's 4-row tiles and single-row tails), with and without bias,
over output widths that are not a multiple of its 24-column panels and strided inputs; they
apply to CPU fp32 only and leave other dtypes on the dense path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tetri.workers import cpu_kernels
from tetri.workers.models.llama import Linear

KERNELS = ["onednn", "panels"]


def _linear(in_features: int, out_features: int, bias: bool, dtype=torch.float32) -> Linear:
    lin = Linear(in_features, out_features, bias=bias)
    g = torch.Generator().manual_seed(in_features * out_features)
    lin.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=g).to(dtype), requires_grad=False)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(out_features, generator=g).to(dtype), requires_grad=False)
    return lin


def _skip_unless(kernel: str) -> None:
    if kernel == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    if kernel == "panels" and cpu_kernels.load() is None:
        pytest.skip("no AVX2 CPU or C compiler here: the kernel does not build")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_dense_at_every_batch_size(kernel, bias):
    _skip_unless(kernel)
    lin = _linear(97, 200, bias)  # 200 outputs: the last 24-column panel is part padding
    weight, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    assert lin.pack(kernel)
    assert lin.weight is None  # the packed copy replaces the dense one
    assert (lin.panels is not None) == (kernel == "panels")
    for rows in (0, 1, 2, 3, 4, 7, 16, 33, 64, 129, 512):
        x = torch.randn(rows, 97)
        torch.testing.assert_close(lin(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(16, 194)[:, ::2]  # a strided input (a view of a wider activation)
    torch.testing.assert_close(lin(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(9, 300)[:, 3:100]  # rows further apart than their width (a split's slice)
    torch.testing.assert_close(lin(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 5, 97)  # leading batch dimensions
    torch.testing.assert_close(lin(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_kernel_off_switch_falls_back_to_onednn(monkeypatch):
    _skip_unless("onednn")
    monkeypatch.setenv("TETRI_CPU_KERNELS", "0")
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
        lin = _linear(32, 48, False)
        assert lin.pack() and lin.panels is None and lin.packed is not None
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()


def test_pack_leaves_other_dtypes_dense():
    lin = _linear(32, 48, False, dtype=torch.bfloat16)
    assert not lin.pack() and lin.packed is None and lin.panels is None and lin.weight is not None
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
