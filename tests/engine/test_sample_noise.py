"""The seeded draw's noise is pure integer math: equal to a pure-Python twin bit for bit, and
computed with int64 tensor ops only (which CPU and CUDA evaluate identically)."""

import random

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.engine.reference_sampler import py_hash, py_uniform
from tetri.workers.sample_noise import as_int64, hash_keys, uniforms


def keys(n, seed=0):
    rng = random.Random(seed)
    edge = [0, 1, -1, 2**63 - 1, -2**63, 2**64 - 1, 2**64, 2**70 + 5, -2**90]
    seeds = edge + [rng.randrange(-2**80, 2**80) for _ in range(n - len(edge))]
    choices = [rng.randrange(0, 64) for _ in range(n)]
    positions = [rng.randrange(0, 1 << 20) for _ in range(n)]
    return seeds, choices, positions


def test_tensor_hash_equals_the_pure_python_hash_bit_for_bit():
    seeds, choices, positions = keys(5000)
    t = hash_keys(*(torch.tensor([as_int64(v) for v in vs], dtype=torch.long) for vs in (seeds, choices, positions)))
    want = [py_hash(s, c, p) for s, c, p in zip(seeds, choices, positions)]
    assert [v & (2**64 - 1) for v in t.tolist()] == want
    u = uniforms(*(torch.tensor([as_int64(v) for v in vs]) for vs in (seeds, choices, positions)))
    assert u.tolist() == [py_uniform(s, c, p) for s, c, p in zip(seeds, choices, positions)]
    assert 0.0 <= min(u.tolist()) and max(u.tolist()) < 1.0


def test_the_hash_is_uniform_and_decorrelated_across_positions():
    n = 20000
    u = uniforms(torch.full((n,), 7), torch.zeros(n, dtype=torch.long), torch.arange(n))
    hist = torch.histc(u, bins=20, min=0, max=1)
    assert float(((hist - n / 20) ** 2 / (n / 20)).sum()) < 60  # chi-square, 19 df, p ~ 1e-6
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.04


class _Dtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.add((func.overloadpacket.__name__, out.dtype))
        return out


def test_the_hash_uses_only_int64_tensor_ops():
    seeds, choices, positions = (torch.tensor([as_int64(v) for v in vs]) for vs in keys(64))
    mode = _Dtypes()
    with mode:
        hash_keys(seeds, choices, positions)
    assert mode.seen and {dtype for _, dtype in mode.seen} == {torch.int64}
    assert {name for name, _ in mode.seen} <= {"add", "mul", "bitwise_xor", "bitwise_and", "bitwise_right_shift",
                                               "__rshift__", "rshift"}
