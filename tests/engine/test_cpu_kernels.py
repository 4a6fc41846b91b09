"""cpu_kernels.decode_attention: each row's query over its own first `lens[row]` keys, read in
place from a stage-like strided view, equals SDPA with the matching padding mask, for the
head sizes the models use (the register path at 64 and the general one), grouped-query
heads, and a context of one key. The build is cached: a second load finds the library.

The per-machine calibration: the choice per class (a kernel only where it beats the library
by the margin), the interleaved best-of-trials timing (with an injected clock), the cache
beside the library (per CPU, measured once), and that whatever is chosen computes what
F.linear does and runs the chosen path. The calibration this machine makes is printed."""

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


def test_attention_handles_only_what_the_kernel_does():
    assert cpu_kernels.attention_handles(torch.zeros(2, 4, 64))
    assert not cpu_kernels.attention_handles(torch.zeros(2, 4, 20))  # not a multiple of 8
    assert not cpu_kernels.attention_handles(torch.zeros(2, 4, 1024))  # past the kernel's accumulator
    assert not cpu_kernels.attention_handles(torch.zeros(2, 4, 64, dtype=torch.bfloat16))


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


# ---- calibration ------------------------------------------------------------------------------

K, L = cpu_kernels.KERNEL, cpu_kernels.LIBRARY


def test_choose_keeps_a_kernel_only_where_it_beats_the_library_by_the_margin():
    seconds = {"gemm:1": {K: 0.80, L: 1.00}, "gemm:8": {K: 0.96, L: 1.00}, "gemm:32": {K: 1.20, L: 1.00},
               "attention": {K: 0.5, L: 0.9}}
    assert cpu_kernels.choose(seconds, margin=0.05) == {"gemm:1": K, "gemm:8": L, "gemm:32": L, "attention": K}
    assert cpu_kernels.choose(seconds, margin=0.0)["gemm:8"] == K


def test_best_seconds_alternates_and_keeps_each_candidates_best_call():
    clock = [0.0]
    calls = []

    def fake(name, cost_s, slow_calls=()):
        def run():
            calls.append(name)
            clock[0] += cost_s * (10 if calls.count(name) in slow_calls else 1)  # slowed by "another process"
        return run

    best = cpu_kernels.best_seconds({"k": fake("k", 1e-3, slow_calls=(2, 3, 5)), "l": fake("l", 2e-3, (4,))},
                                    timer=lambda: clock[0], budget_s=12e-3)
    assert best == pytest.approx({"k": 1e-3, "l": 2e-3})
    assert calls == ["k", "l"] + ["k", "l"] * 6  # a sizing call each, then interleaved (12 ms / 2 ms = 6)


def test_calibration_is_cached_per_cpu(tmp_path):
    lib_path = tmp_path / "cpu_kernels-abc.so"
    measured = []

    def measure():
        measured.append(1)
        return {"gemm:1": {K: 1.0, L: 2.0}, "gemm:8": {K: 1.0, L: 1.0}, "gemm:32": {K: 3.0, L: 1.0},
                "gemm:128": {K: 3.0, L: 1.0}, "attention": {K: 2.0, L: 1.0}}

    cal = cpu_kernels.calibrate(lib_path, measure, cpu="cpu-a")
    assert (cal.gemm, cal.attention) == ({"1": K, "8": L, "32": L, "128": L}, L)
    assert [cal.gemm_choice(r) for r in (1, 7, 8, 31, 32, 500)] == [K, K, L, L, L, L]
    assert cal.gemm_choices == {K, L}
    path = cpu_kernels.calibration_path(lib_path, "cpu-a")
    assert path.parent == tmp_path and path.exists()  # beside the compiled library
    assert cpu_kernels.calibrate(lib_path, measure, cpu="cpu-a") == cal and len(measured) == 1  # read, not measured
    cpu_kernels.calibrate(lib_path, measure, cpu="cpu-b")  # another CPU (a cache dir shared by machines)
    assert len(measured) == 2
    path.write_text("{not json")  # a torn or stale file is measured again, not trusted
    assert cpu_kernels.calibrate(lib_path, measure, cpu="cpu-a") == cal and len(measured) == 3


def _linear_layer(in_features=97, out_features=200, bias=True):
    from tetri.workers.models.llama import Linear

    lin = Linear(in_features, out_features, bias=bias)
    g = torch.Generator().manual_seed(1)
    lin.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=g), requires_grad=False)
    lin.bias = torch.nn.Parameter(torch.randn(out_features, generator=g), requires_grad=False)
    return lin


@pytest.mark.parametrize("gemm", [{"1": K, "8": K, "32": L, "128": L}, {"1": L, "8": L, "32": L, "128": L},
                                  {"1": K, "8": K, "32": K, "128": K}], ids=["mixed", "library", "kernel"])
def test_linear_runs_what_the_calibration_chose_and_equals_f_linear(monkeypatch, gemm):
    cal = cpu_kernels.Calibration(gemm=gemm, attention=L, seconds={}, cpu="x")
    monkeypatch.setattr(cpu_kernels, "calibration", lambda: cal)
    ran = []
    real = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda *a: ran.append(a[1].numel() // a[1].shape[-1]) or real(*a))
    lin = _linear_layer()
    weight, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    assert lin.pack()
    assert (lin.panels is not None) == (K in gemm.values()) and (lin.packed is not None) == (L in gemm.values())
    for rows in (1, 4, 7, 8, 31, 32, 129, 512):
        x = torch.randn(rows, 97)
        torch.testing.assert_close(lin(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert ran == [r for r in (1, 4, 7, 8, 31, 32, 129, 512) if cal.gemm_choice(r) == K]


def test_attention_applies_where_the_calibration_chose_the_kernel(monkeypatch):
    kv = torch.zeros(2, 4, 64)
    for choice, applies in ((K, True), (L, False)):
        cal = cpu_kernels.Calibration(gemm={}, attention=choice, seconds={}, cpu="x")
        monkeypatch.setattr(cpu_kernels, "calibration", lambda cal=cal: cal)
        assert cpu_kernels.attention_applies(kv) is applies
    assert not cpu_kernels.attention_applies(torch.zeros(2, 4, 20))  # never where it cannot run


def test_this_machines_calibration(tmp_path, monkeypatch):
    """Measures for real (in a fresh cache) and prints what this machine picks."""
    monkeypatch.setenv("TETRI_CACHE_DIR", str(tmp_path))
    cpu_kernels.load.cache_clear()
    cpu_kernels.calibration.cache_clear()
    try:
        cal = cpu_kernels.calibration()
        assert set(cal.gemm) == {str(b) for b in cpu_kernels.GEMM_BUCKETS} and cal.attention in (K, L)
        assert set(cal.seconds) == {f"gemm:{b}" for b in cpu_kernels.GEMM_BUCKETS} | {"attention"}
        assert all(0 < t < 1 for s in cal.seconds.values() for t in s.values())
        assert list(tmp_path.glob("kernels/*-calibration-*.json"))
        ratios = {c: round(s[L] / s[K], 2) for c, s in cal.seconds.items()}
        print(f"calibration on {cal.cpu}: gemm {cal.gemm}, attention {cal.attention}; "
              f"library/kernel time {ratios}")
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()
        cpu_kernels.calibration.cache_clear()
