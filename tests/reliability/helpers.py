"""Shared helpers of the reliability tests: the tools under tools/, /proc inspection, SSE."""

from __future__ import annotations

import json
import os
import re
import time

from tests.tools import load_tool  # noqa: F401  (the reliability tests import it from here)

SERVED = "default-model-v1"


def pid_alive(pid: int | None) -> bool:
    """Alive and not a zombie (the one definition lives in tools/chaos.py)."""
    return load_tool("chaos").pid_alive(pid)


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            out.add(m.group(1))
    return out


def ipc_dir_of(pid: int) -> str | None:
    """The private ipc:// directory a tetri process has sockets in (its open unix sockets,
    matched against /proc/net/unix), so tests never guess among other servers' dirs."""
    inodes = _socket_inodes(pid)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[6] in inodes and "/tetri-ipc-" in parts[7]:
                return os.path.dirname(parts[7])
    return None


def shm_segments_of(pids) -> set[str]:
    """Names of the /dev/shm/tetri-* segments the given processes have mapped."""
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    m = re.search(r"/dev/shm/(tetri-[^\s]+)", line)
                    if m:
                        names.add(m.group(1))
        except FileNotFoundError:
            continue
    return names


def wait_until(pred, timeout_s: float, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every_s)


def parse_sse(raw: bytes) -> list:
    """SSE body -> list of decoded `data:` payloads ("[DONE]" kept as the string)."""
    events = []
    for line in raw.splitlines():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def reference(offline, prompts, max_tokens):
    """Greedy ignore_eos outputs of the offline engine (`max_tokens`: one int or one per prompt)."""
    from tetri import SamplingParams

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lengths]
    return [list(o.token_ids) for o in offline.generate(prompts, params)]
