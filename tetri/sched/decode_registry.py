"""Decode policies by name: the one place that knows every policy module."""

from __future__ import annotations

from tetri.sched.decode_base import DecodePolicy
from tetri.sched.decode_policy import GreedyDecodePolicy, ReserveDynamicPolicy, ReserveStaticPolicy
from tetri.sched.mlfq import MLFQDecodePolicy

DECODE_POLICIES = ("greedy", "reserve-static", "reserve-dynamic", "mlfq")


def make_decode_policy(name: str, **kwargs) -> DecodePolicy:
    """Build a decode policy by name; kwargs go to the policy (only mlfq takes any:
    see `tetri.sched.mlfq.MLFQDecodePolicy`)."""
    if name == "mlfq":
        return MLFQDecodePolicy(**kwargs)
    simple = {"greedy": GreedyDecodePolicy, "reserve-static": ReserveStaticPolicy,
              "reserve-dynamic": ReserveDynamicPolicy}
    if name not in simple:
        raise ValueError(f"decode policy must be one of {DECODE_POLICIES}, got {name!r}")
    if kwargs:
        raise TypeError(f"decode policy {name!r} takes no options, got {sorted(kwargs)}")
    return simple[name]()
