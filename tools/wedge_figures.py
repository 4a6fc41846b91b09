"""Before/after figures for issue 20 items 1 and 2, on a tiny KV pool (CPU).

Starts `python -m tetri.cli` from the current directory's code (run it from a checkout of the
commit to measure, with PYTHONPATH pointing at it) with `--kv-cache-gb 0.002 --chunk-size 32`
(131 blocks of 16 tokens per worker on the embedded model, `TETRI_DEFAULT_MODEL=embedded`), then:

1. an over-long prompt (3000 tokens, more than a prefill pool holds): its status and seconds,
   then a short request: served or not, and its seconds;
2. both decode workers SIGSTOPped, three 1000-token prompts: once the prefill pool is full (or
   after 20 s), the prefill worker's CPU share (a core = 1.0) over 3 s.

Every wait has a deadline (the client's `--timeout-s`), so a wedge prints as a timeout.

    PYTHONPATH=$PWD python tools/wedge_figures.py
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return json.loads(r.read())


def post(base: str, body: dict, timeout_s: float) -> tuple[str, float]:
    t0 = time.monotonic()
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            r.read()
            status = str(r.status)
    except urllib.error.HTTPError as e:
        status = f"{e.code} {json.loads(e.read()).get('error', {}).get('message', '')[:90]}"
    except (TimeoutError, urllib.error.URLError, OSError) as e:
        status = f"no answer ({type(e).__name__})"
    return status, time.monotonic() - t0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout-s", type=float, default=30.0)
    ap.add_argument("--skip-item1", action="store_true", help="item 2 alone, on a fresh server (where item 1 wedges it)")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="wedge-figures-", suffix=".log", delete=False)
    srv = subprocess.Popen([sys.executable, "-m", "tetri.cli", "--port", str(port), "--device", "cpu", "--prefill", "1",
                            "--decode", "2", "--kv-cache-gb", "0.002", "--chunk-size", "32", "--log-level", "warning"],
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, "TETRI_DEFAULT_MODEL": "embedded"})
    stopped: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(base + "/health", timeout=10) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline or srv.poll() is not None:
                sys.exit(f"the server did not start; log: {log.name}")
            time.sleep(0.5)
        model = get(base, "/v1/models")["data"][0]["id"]
        body = dict(model=model, max_tokens=3, temperature=0.0, ignore_eos=True)

        if not args.skip_item1:
            status, secs = post(base, {**body, "prompt": prompt(3000, 1)}, args.timeout_s)
            print(f"item 1: over-long prompt (3000 tokens): {status} after {secs:.3f} s")
            status, secs = post(base, {**body, "prompt": prompt(20, 2)}, args.timeout_s)
            print(f"item 1: the next request (20 tokens): {status} after {secs:.3f} s")

        workers = get(base, "/workers")
        workers = workers["workers"] if isinstance(workers, dict) else workers
        (prefill,) = [w["pid"] for w in workers if w["role"] == "prefill"]
        stopped = [w["pid"] for w in workers if w["role"] == "decode"]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        with cf.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(post, base, {**body, "prompt": prompt(1000, 20 + i)}, args.timeout_s) for i in range(3)]
            t_fill = time.monotonic()
            used = 0
            while time.monotonic() - t_fill < 20:
                rows = get(base, "/workers")
                rows = rows["workers"] if isinstance(rows, dict) else rows
                row = next(w for w in rows if w["role"] == "prefill")
                used, total = row.get("kv_blocks_used", 0), row.get("kv_blocks_total", 0)
                if total and used >= total - 1:
                    break
                time.sleep(0.1)
            time.sleep(1.0)
            c0, t0 = cpu_s(prefill), time.monotonic()
            time.sleep(3.0)
            share = (cpu_s(prefill) - c0) / (time.monotonic() - t0)
            print(f"item 2: back-pressured prefill worker ({used} of {total} blocks held): {share:.3f} of a core")
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            stopped = []
            results = [f.result() for f in futs]
        print("item 2: the three prompts after SIGCONT: " + ", ".join(f"{s} ({t:.1f} s)" for s, t in results))
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        srv.send_signal(signal.SIGINT)
        try:
            srv.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
        print(f"server log: {log.name}")


if __name__ == "__main__":
    main()
