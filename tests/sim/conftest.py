"""Fixtures for the simulator tests: cost models and small crafted workloads."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tetri.bench.workload import Request
from tetri.sim.costmodel import HARDWARE_PRESETS, MODEL_PRESETS, CostModel


@pytest.fixture
def h200_cost() -> CostModel:
    return CostModel(MODEL_PRESETS["llama3-8b"], HARDWARE_PRESETS["h200"])


def poisson_requests(n: int, rate: float, prompt_range: tuple[int, int], output_range: tuple[int, int],
                     seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        out.append(Request(rng.randint(*prompt_range), rng.randint(*output_range), t))
        t += rng.expovariate(rate)
    return out


@pytest.fixture
def make_requests():
    """make_requests(n, rate, (prompt lo, hi), (output lo, hi), seed=0) -> Poisson workload."""
    return poisson_requests


@pytest.fixture
def mixed_requests() -> list[Request]:
    """A small mixed workload: short and long prompts, short and long outputs, some 1-token."""
    reqs = poisson_requests(120, 40.0, (20, 3000), (1, 300), seed=3)
    return [Request(r.prompt_tokens, 1 if i % 17 == 0 else r.output_tokens, r.arrival_s) for i, r in enumerate(reqs)]


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """The shared traces folder; skips the test when it is absent."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
    if not (path / "azure_llm_2023").is_dir():
        pytest.skip("shared traces folder not found")
    return path
