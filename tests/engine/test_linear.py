"""Linear.pack(): oneDNN's prepacked weight computes what `F.linear` does, at every batch size
the engine runs (one decode row up to a prefill chunk), with and without bias; it applies to
CPU fp32 only and leaves other dtypes on the dense path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tetri.workers.models.llama import Linear


def _linear(in_features: int, out_features: int, bias: bool, dtype=torch.float32) -> Linear:
    lin = Linear(in_features, out_features, bias=bias)
    g = torch.Generator().manual_seed(in_features * out_features)
    lin.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=g).to(dtype), requires_grad=False)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(out_features, generator=g).to(dtype), requires_grad=False)
    return lin


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_dense_at_every_batch_size(bias):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    lin = _linear(96, 200, bias)
    weight, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    assert lin.pack()
    assert lin.weight is None  # the packed copy replaces the dense one
    for rows in (1, 2, 7, 16, 33, 64, 129, 512):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(lin(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(16, 192)[:, ::2]  # a strided input (a view of a wider activation)
    torch.testing.assert_close(lin(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_pack_leaves_other_dtypes_dense():
    lin = _linear(32, 48, False, dtype=torch.bfloat16)
    assert not lin.pack() and lin.packed is None and lin.weight is not None
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
