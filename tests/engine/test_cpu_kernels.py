"""cpu_kernels.decode_attention: each row's query over its own first `lens[row]` keys, read in
place from a stage-like strided view, equals SDPA with the matching padding mask, for the
head sizes the models use (the register path at 64 and the general one), grouped-query
heads, and a context of one key. The build is cached: a second load finds the library."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tetri.workers import cpu_kernels
from tetri.workers.attention import key_mask

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no AVX2 CPU or C compiler: the kernels do not build")


@pytest.mark.parametrize("head_dim", [16, 40, 64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_decode_attention_matches_sdpa(head_dim, heads, kv_heads):
    g = torch.Generator().manual_seed(head_dim * heads)
    rows, capacity = 5, 48
    lens = torch.tensor([1, 48, 17, 30, 2])
    # A stage: [slots, layers, 2, kv_heads, capacity, head_dim]; attend over layer 1 of it.
    stage = torch.randn(rows, 3, 2, kv_heads, capacity, head_dim, generator=g)
    k, v = stage[:, 1, 0], stage[:, 1, 1]
    q = torch.randn(rows, heads, head_dim, generator=g)
    scale = head_dim ** -0.5
    got = cpu_kernels.decode_attention(cpu_kernels.load(), q, k, v, lens, scale)
    n = int(lens.max())
    want = F.scaled_dot_product_attention(q.unsqueeze(2), k[:, :, :n], v[:, :, :n], attn_mask=key_mask(lens, n),
                                          scale=scale, enable_gqa=True).squeeze(2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_applies_only_where_the_kernel_does():
    assert cpu_kernels.attention_applies(torch.zeros(2, 4, 64))
    assert not cpu_kernels.attention_applies(torch.zeros(2, 4, 20))  # not a multiple of 8
    assert not cpu_kernels.attention_applies(torch.zeros(2, 4, 1024))  # past the kernel's accumulator
    assert not cpu_kernels.attention_applies(torch.zeros(2, 4, 64, dtype=torch.bfloat16))


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TETRI_CACHE_DIR", str(tmp_path))
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is not None
        built = list((tmp_path / "kernels").glob("*.so"))
        assert len(built) == 1 and not list((tmp_path / "kernels").glob("tmp*"))
        stamp = built[0].stat().st_mtime_ns
        cpu_kernels.load.cache_clear()
        assert cpu_kernels.load() is not None
        assert built[0].stat().st_mtime_ns == stamp  # found, not rebuilt
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()
