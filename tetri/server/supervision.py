"""What the supervisor decides and records about workers, kept apart from the I/O around it
(tested on its own): the restart decision (`RestartBook`) and the KV transfer path per worker
pair (`worker_fields`, for /workers).

A dead worker is restarted with back-off (`launch.restart_delay_s`: 1, 2, 4 ... 30 s) until `--max-restarts`, unless it
failed to *start* the same way `SAME_FAILURE_LIMIT` times in a row (it died before its Ready, or
within `STARTUP_GRACE_S` after it, with the same error text once numbers are blanked): the same
failure will come back at every restart, so it stops early. A worker given up on keeps its
reason, which /health and /workers report.
"""

from __future__ import annotations

import re

from tetri.launch import restart_delay_s

SAME_FAILURE_LIMIT = 2
STARTUP_GRACE_S = 10.0
"""A death this soon after Ready still counts as a failure to start (e.g. on the first PeerPools)."""


def signature(why: str) -> str:
    """An error's text with its numbers blanked (pids, addresses, names differ between lives)."""
    return re.sub(r"(0x)?[0-9a-fA-F]*[0-9][0-9a-fA-F]*", "#", why)


class RestartBook:
    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.start_failures: dict[int, tuple[str, int]] = {}  # worker -> (error signature, times in a row)
        self.failed: dict[int, str] = {}  # workers given up on, and why

    def after_death(self, wid: int, role: str, why: str, at_start: bool, restarts: int) -> float | None:
        """Seconds to wait before restarting the worker, or None when it is given up on."""
        sig, count = self.start_failures.get(wid, ("", 0))
        if at_start:
            count = count + 1 if signature(why) == sig else 1
            self.start_failures[wid] = (signature(why), count)
        else:
            self.start_failures.pop(wid, None)
        if at_start and count >= SAME_FAILURE_LIMIT:
            self.failed[wid] = (f"{role} worker {wid} failed to start {count} times in a row with the same error; "
                                f"not restarting it: {why}")
        elif restarts >= self.max_restarts:
            self.failed[wid] = f"{role} worker {wid} died {restarts + 1} times (--max-restarts {self.max_restarts}): {why}"
        if wid in self.failed:
            return None
        return restart_delay_s(restarts)


def worker_fields(wid: int, failed: dict[int, str], kv_paths: dict, dead: set[int]) -> dict:
    """/workers: why a dead worker is not restarted (`error`; its state stays `dead`); a live
    decode worker's KV transfer path per peer pool (`kv_paths`: its last `PeerPaths`)."""
    out = {}
    if wid in failed:
        out["error"] = failed[wid]
    paths = kv_paths.get(wid)
    if paths is not None and wid not in dead:
        out |= dict(kv_transfer={str(src): path for src, path in sorted(paths.paths.items())},
                    kv_transfer_errors={str(src): e for src, e in sorted(paths.errors.items())})
    return out


def missing_roles_reason(roles: set[str], live_roles: set[str], failed: dict[int, str]) -> str | None:
    """/health's reason for a 503: the roles with no live worker, and why workers were given up on."""
    missing = roles - live_roles
    if not missing:
        return None
    return "; ".join([f"no live {' or '.join(sorted(missing))} worker", *failed.values()])
