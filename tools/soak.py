"""Soak run: bounded steady load against `tetri-serve`, watching every process's memory.

Starts `tetri-serve --device cpu --prefill 1 --decode 1` (through
`tests/runtime/server_proc.py`), keeps up to `--concurrency` greedy streaming completions in
flight (at most `--rate` starts per second) for `--duration-s` (token-id prompts of 4..300
ids, max_tokens 8..64, ignore_eos; a few clients hang up early so the abort paths run too),
and samples the resident memory (VmRSS in /proc/<pid>/status) of the front process and of
every worker (pids from /workers) every `--sample-every-s`. The report compares each
process's RSS right after the warm-up with its RSS at the end: growth in MiB and %, the
least-squares slope after warm-up (MiB/min), and `flat` = growth below
`--flat-threshold-pct` for every process. After the load it waits for
the server to drain and reports what the workers still hold (must be nothing).

    python tools/soak.py                      # 3 minutes
    python tools/soak.py --duration-s 600 --json-out soak.json

`main(argv, server=None) -> dict`: tests pass an already running `ServerProc` as `server`
(it is then neither started nor stopped here). All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chaos import Plan, parse_metrics, stream_request  # noqa: E402
from tests.runtime.server_proc import ServerProc  # noqa: E402

SERVER_ARGS = ("--device", "cpu", "--prefill", "1", "--decode", "1")


def rss_kib(pid: int | None) -> int | None:
    """VmRSS of a live process in KiB (None when it is gone)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return None
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / den


async def _workers(session, base_url: str) -> dict:
    async with session.get(base_url + "/workers") as r:
        return await r.json()


async def soak(srv: ServerProc, model: str, *, duration_s: float, concurrency: int, sample_every_s: float,
               seed: int, disconnect_frac: float, deadline_s: float, rate: float = 0.0) -> dict:
    import aiohttp

    rng = random.Random(seed)
    front_pid = srv.proc.pid
    samples: list[dict] = []  # {"t": s, "rss": {name: KiB}, "pids": {name: pid}}
    counts = {"completed": 0, "errored": 0, "cancelled": 0, "hung": 0, "tokens": 0}
    errors: dict[str, int] = {}
    t0 = time.monotonic()
    stop_at = t0 + duration_s
    seq = 0

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4),
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:

        async def sampler() -> None:
            while True:
                body = await _workers(session, srv.base_url)
                pids = {"front": front_pid}
                for w in body["workers"]:
                    pids[f"w{w['worker_id']}-{w['role']}"] = w["pid"]
                samples.append({"t": round(time.monotonic() - t0, 2), "pids": pids,
                                "rss": {name: rss_kib(pid) for name, pid in pids.items()}})
                if time.monotonic() >= stop_at:
                    return
                await asyncio.sleep(min(sample_every_s, max(0.0, stop_at - time.monotonic())))

        next_start = [t0]

        async def client() -> None:
            nonlocal seq
            while time.monotonic() < stop_at:
                if rate > 0:  # a global pace: request starts at most `rate` per second
                    at = next_start[0] = max(next_start[0] + 1.0 / rate, time.monotonic())
                    await asyncio.sleep(max(0.0, at - time.monotonic()))
                    if time.monotonic() >= stop_at:
                        return
                seq += 1
                prompt = [rng.randrange(4, 500) for _ in range(rng.randint(4, 300))]
                mt = rng.randint(8, 64)
                disc = rng.randint(0, mt // 2) if rng.random() < disconnect_frac else None
                out = await stream_request(session, srv.base_url, model, Plan(seq, prompt, mt, disc), deadline_s)
                counts[out.status] = counts.get(out.status, 0) + 1
                counts["tokens"] += len(out.tokens)
                if out.status in ("errored", "hung"):
                    key = (out.error or "?")[:80]
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(sampler(), *(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    return {"samples": samples, "counts": counts, "errors": errors, "elapsed_s": elapsed, "requests": seq}


def summarize(samples: list[dict], warmup_s: float, threshold_pct: float) -> dict:
    names = list(samples[0]["rss"]) if samples else []
    warm = next((s for s in samples if s["t"] >= warmup_s), samples[-1] if samples else None)
    end = samples[-1] if samples else None
    procs = {}
    for name in names:
        series = [(s["t"], s["rss"][name] / 1024.0) for s in samples if s["rss"].get(name)]
        post = [(t, v) for t, v in series if t >= (warm["t"] if warm else 0)]
        pids = sorted({s["pids"].get(name) for s in samples if s["pids"].get(name)})
        w_kib, e_kib = (warm or {}).get("rss", {}).get(name), (end or {}).get("rss", {}).get(name)
        if not w_kib or not e_kib:
            procs[name] = {"pids": pids, "error": "process gone"}
            continue
        growth = (e_kib - w_kib) / 1024.0
        pct = 100.0 * (e_kib - w_kib) / w_kib
        sl = slope_per_min(post)
        procs[name] = {
            "pids": pids,
            "rss_start_mib": round(series[0][1], 1),
            "rss_after_warmup_mib": round(w_kib / 1024.0, 1),
            "rss_end_mib": round(e_kib / 1024.0, 1),
            "rss_max_mib": round(max(v for _, v in series), 1),
            "growth_mib": round(growth, 1),
            "growth_pct": round(pct, 2),
            "slope_mib_per_min": round(sl, 2) if sl is not None else None,
            "flat": len(pids) == 1 and pct < threshold_pct,
        }
    return {"warmup_sample_t": warm["t"] if warm else None, "end_sample_t": end["t"] if end else None,
            "processes": procs, "flat": bool(procs) and all(p.get("flat") for p in procs.values())}


def main(argv: list[str] | None = None, server: ServerProc | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=180.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rate", type=float, default=10.0, help="request starts per second at most (0: closed loop)")
    ap.add_argument("--sample-every-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, default=None, help="default: 20%% of the duration, at least 10 s")
    ap.add_argument("--flat-threshold-pct", type=float, default=10.0)
    ap.add_argument("--disconnect-frac", type=float, default=0.1)
    ap.add_argument("--request-deadline-s", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra tetri-serve flag (repeatable)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    warmup = args.warmup_s if args.warmup_s is not None else max(10.0, 0.2 * args.duration_s)
    warmup = min(warmup, 0.8 * args.duration_s)

    own = server is None
    t_start = time.monotonic()
    srv = ServerProc(*SERVER_ARGS, *args.server_arg).start() if own else server
    report: dict = {"server_args": [*SERVER_ARGS, *args.server_arg] if own else server.args,
                    "server_log": srv.log.name, "duration_s": args.duration_s, "concurrency": args.concurrency,
                    "rate": args.rate,
                    "warmup_s": warmup, "sample_every_s": args.sample_every_s,
                    "flat_threshold_pct": args.flat_threshold_pct}
    try:
        model = srv.openai().models.list().data[0].id
        restarts_before = sum(w["restarts"] for w in srv.workers())
        run = asyncio.run(soak(srv, model, duration_s=args.duration_s, concurrency=args.concurrency,
                               sample_every_s=args.sample_every_s, seed=args.seed,
                               disconnect_frac=args.disconnect_frac, deadline_s=args.request_deadline_s,
                               rate=args.rate))
        drained = srv.wait_idle(60.0)
        body = srv.get("/workers")[1]
        live = [w for w in body["workers"] if w["state"] != "dead"]
        metrics = parse_metrics(srv.get("/metrics")[1])
        counts = run["counts"]
        report.update({
            "elapsed_s": round(run["elapsed_s"], 1),
            "requests": run["requests"],
            "completed": counts.get("completed", 0),
            "errored": counts.get("errored", 0),
            "cancelled": counts.get("cancelled", 0),
            "hung": counts.get("hung", 0),
            "error_kinds": run["errors"],
            "tokens_received": counts["tokens"],
            "requests_per_s": round(run["requests"] / run["elapsed_s"], 2),
            "tokens_per_s": round(counts["tokens"] / run["elapsed_s"], 1),
            "num_samples": len(run["samples"]),
            "drained": drained,
            "num_running_after": body["num_running"],
            "leaked_blocks": sum(w["kv_blocks_used"] for w in live),
            "worker_restarts": sum(w["restarts"] for w in body["workers"]) - restarts_before,
            "generation_tokens_total": sum(v for _, v in metrics.get("tetri:generation_tokens_total", [])),
            **summarize(run["samples"], warmup, args.flat_threshold_pct),
            "series_mib": [[s["t"], *(round(v / 1024.0, 1) if v else None for v in s["rss"].values())]
                           for s in run["samples"]],
            "series_columns": ["t", *(run["samples"][0]["rss"] if run["samples"] else [])],
        })
    finally:
        if own:
            report["server_exit_code"] = srv.stop()
    report["total_s"] = round(time.monotonic() - t_start, 1)
    report["ok"] = bool(report.get("flat") and report.get("hung") == 0 and report.get("errored") == 0
                        and report.get("leaked_blocks") == 0 and report.get("worker_restarts") == 0)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    rep = main()
    print(json.dumps(rep, indent=2))
    raise SystemExit(0 if rep["ok"] else 1)
