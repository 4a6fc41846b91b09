"""CPU worker threads: how many each worker gets, and the passive OpenMP waiting that lets
workers share cores (set in the child's environment, so it holds before torch loads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tetri.cli import cpu_threads
from tetri.launch import _child_env


def test_every_worker_may_use_every_core_and_then_waits_passively():
    assert cpu_threads(2, 2) == (2, True)
    assert cpu_threads(16, 2) == (15, True)  # one core left for the front
    assert cpu_threads(1, 2) == (1, True)
    assert cpu_threads(2, 2, requested=1) == (1, False)  # the old split: no core is shared
    assert cpu_threads(16, 4, requested=4) == (4, False)
    with pytest.raises(ValueError):
        cpu_threads(2, 2, requested=0)


def _child_sees() -> str:
    code = "import os; print(os.environ.get('OMP_WAIT_POLICY', '-'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_child_environment_carries_the_wait_policy_and_the_parent_keeps_its_own(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with _child_env({"OMP_WAIT_POLICY": "PASSIVE"}):
        assert _child_sees() == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ and _child_sees() == "-"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    with _child_env({"OMP_WAIT_POLICY": "PASSIVE"}):
        assert _child_sees() == "ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
