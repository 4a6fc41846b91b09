"""argparse value types shared by tetri-bench and tetri-sim (one workload contract, one parser)."""

from __future__ import annotations

import argparse

from tetri.bench.records import Slo


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {text})")
    return value


def slo(text: str) -> Slo:
    try:
        return Slo.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive_floats(text: str) -> list[float]:
    """'1,2.5,4' -> [1.0, 2.5, 4.0]; every value > 0."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad list {text!r}") from exc
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be > 0 (got {text!r})")
    return values
