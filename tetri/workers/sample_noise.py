"""Counter-based uniforms for seeded sampling: the draw of output position `position` of choice
`choice` of a request with seed `seed` is a pure function of those three integers.

The hash is splitmix64 (Steele, Lea, Flood 2014; the finalizer of Java's SplittableRandom)
applied three times, absorbing seed, choice and position. It is written with int64 tensor
additions, multiplications, xors, ands and shifts only: wrapping two's-complement arithmetic
that CPU and CUDA compute bit for bit alike (a logical right shift is an arithmetic shift and
a mask), so a seeded row gets the same uniform on any device, in any batch and in any worker.
tests/engine/test_sample_noise.py checks it against a pure-Python twin.
"""

from __future__ import annotations

import torch

_U64 = 1 << 64


def as_int64(value: int) -> int:
    """`value` mod 2**64 as a signed int64 (the bits a seed of any size contributes)."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


GAMMA = as_int64(0x9E3779B97F4A7C15)
MUL1 = as_int64(0xBF58476D1CE4E5B9)
MUL2 = as_int64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed integers)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """One splitmix64 step: add the golden gamma, then the finalizer."""
    x = x + GAMMA
    x = (x ^ _srl(x, 30)) * MUL1
    x = (x ^ _srl(x, 27)) * MUL2
    return x ^ _srl(x, 31)


def hash_keys(seeds: torch.Tensor, choices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """64 random bits (as int64) per (seed, choice, position); int64 tensors of one shape."""
    return mix64(mix64(mix64(seeds) + choices) + positions)


def uniforms(seeds: torch.Tensor, choices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1): the top 53 bits of the hash, exactly representable."""
    return _srl(hash_keys(seeds, choices, positions), 11).to(torch.float64) * 2.0**-53
