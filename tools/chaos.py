"""Chaos run: a bounded streaming load against a live `tetri-serve` while workers are SIGKILLed.

Starts `tetri-serve --device cpu --prefill 1 --decode 2 --chunk-size 64` (through
`tests/runtime/server_proc.py`), sends `--requests` greedy streaming completions (token-id
prompts of 4..300 ids, max_tokens 8..64, ignore_eos) in waves of `--concurrency` spread over
`--duration-s`, never more than `--concurrency` in flight; `--disconnect-frac` of the clients
hang up at a random phase (before the first chunk, or after a random number of chunks). Once
`--kill-decode-at` of the requests were started it SIGKILLs the busiest decode worker (as soon
as one is running requests), once `--kill-prefill-at` were started the prefill worker (as soon
as it is prefilling); pids come from /workers. A 429/503 answered before the stream starts is
retried with back-off (the server refuses new requests while its only prefill worker is
down). Then it waits for the server to drain and every worker to be back (restarts with
back-off). The block-accounting invariant visible from outside is per worker: zero
`kv_blocks_used` on every live worker once nothing runs (`BlockAllocator.check_invariants` is
not reachable over HTTP, and live workers never call it). It prints one JSON report:

    sent, completed, errored, cancelled, hung (no answer within --request-deadline-s; must be 0),
    migrated (tetri:requests_migrated_total), restarts, refused_attempts (429/503 answers that
    were retried: while the only prefill worker is down the server refuses new requests),
    leaked_blocks (sum of kv_blocks_used over live workers after the drain; must be 0),
    kv_usage_after (max tetri:kv_cache_usage_perc after the drain; must be 0),
    mismatches (completed outputs that differ from the offline engine's; must be 0),
    prefix_mismatches (tokens a cancelled/errored stream did receive that are not a prefix of
    the offline output; must be 0), healthy_at_end (/health 200, every worker ready again).

    python tools/chaos.py                        # 200 requests over ~75 s
    python tools/chaos.py --requests 120 --duration-s 25 --json-out chaos.json

`main(argv) -> dict` is what tests/reliability/test_chaos.py calls. Exit status 0 when every
invariant held (`ok`), 1 otherwise. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.runtime.server_proc import ServerProc  # noqa: E402

SERVER_ARGS = ("--device", "cpu", "--prefill", "1", "--decode", "2", "--chunk-size", "64")


# ---- one streaming request ------------------------------------------------------------------


@dataclass
class Plan:
    idx: int
    prompt: list[int]
    max_tokens: int
    disconnect_after: int | None = None
    """None: read to the end; 0: hang up before the first chunk; k: after k chunks."""


@dataclass
class Outcome:
    idx: int
    status: str = "pending"  # completed | errored | cancelled | hung
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    attempts: int = 0
    refused: int = 0
    seconds: float = 0.0


def make_plans(n: int, seed: int, disconnect_frac: float, min_prompt: int = 4, max_prompt: int = 300,
               min_tokens: int = 8, max_tokens: int = 64) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        prompt = [rng.randrange(4, 500) for _ in range(rng.randint(min_prompt, max_prompt))]
        mt = rng.randint(min_tokens, max_tokens)
        disc = None
        if rng.random() < disconnect_frac:
            disc = 0 if rng.random() < 0.25 else rng.randint(1, max(1, mt - 2))
        plans.append(Plan(i, prompt, mt, disc))
    return plans


class _Hangup(Exception):
    pass


async def stream_request(session, base_url: str, model: str, plan: Plan, deadline_s: float,
                         headers: dict | None = None) -> Outcome:
    """Stream one greedy completion. 429/503 before the stream starts are retried (with
    back-off, honouring Retry-After) until the deadline; past the deadline the request is
    `hung` if it was inside a response, `errored` if it was being refused."""
    out = Outcome(plan.idx)
    start = time.monotonic()
    end_at = start + deadline_s
    body = {"model": model, "prompt": plan.prompt, "max_tokens": plan.max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "return_token_ids": True}
    backoff = 0.25
    while True:
        out.attempts += 1
        try:
            retry_after = await asyncio.wait_for(_attempt(session, base_url, body, plan, out, headers),
                                                 max(0.01, end_at - time.monotonic()))
        except asyncio.TimeoutError:
            out.status, out.error = "hung", f"no end of response within {deadline_s:.0f} s"
            break
        if retry_after is None:
            break
        out.refused += 1
        wait = max(backoff, min(retry_after, 2.0))
        if time.monotonic() + wait >= end_at:
            out.status = "errored"
            out.error = f"refused until the deadline ({out.refused} times): {out.error}"
            break
        await asyncio.sleep(wait)
        backoff = min(2.0, backoff * 2)
    out.seconds = round(time.monotonic() - start, 3)
    return out


async def _attempt(session, base_url: str, body: dict, plan: Plan, out: Outcome, headers) -> float | None:
    """One HTTP attempt. Returns a retry delay when refused (429/503), else None (outcome set)."""
    try:
        async with session.post(base_url + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status in (429, 503):
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                try:
                    return float(resp.headers.get("Retry-After", "0"))
                except ValueError:
                    return 0.0
            if resp.status != 200:
                out.status, out.error = "errored", f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return None
            if plan.disconnect_after == 0:
                resp.close()
                out.status = "cancelled"
                return None
            chunks = 0
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    out.status, out.error = "errored", str(obj["error"].get("message"))[:300]
                    return None
                for ch in obj.get("choices") or []:
                    out.tokens.extend(ch.get("token_ids") or [])
                    if ch.get("finish_reason"):
                        out.finish_reason = ch["finish_reason"]
                chunks += 1
                if plan.disconnect_after is not None and chunks >= plan.disconnect_after and out.finish_reason is None:
                    resp.close()
                    out.status = "cancelled"
                    return None
            if done and out.finish_reason is not None:
                out.status = "completed"
            else:
                out.status, out.error = "errored", "stream ended without [DONE] and a finish reason"
            return None
    except (aiohttp.ClientError, ConnectionError, OSError) as e:
        out.status, out.error = "errored", f"{type(e).__name__}: {e}"[:300]
        return None


# ---- server helpers -------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text -> {name: [(labels, value)]}."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            head, value = line.rsplit(" ", 1)
            val = float(value)
        except ValueError:
            continue
        labels: dict = {}
        if "{" in head:
            name, rest = head.split("{", 1)
            for part in rest.rstrip("}").split(","):
                if "=" in part:
                    k, v = part.split("=", 1)
                    labels[k.strip()] = v.strip().strip('"')
        else:
            name = head
        out.setdefault(name, []).append((labels, val))
    return out


def metric_total(metrics: dict, name: str) -> float:
    return sum(v for _, v in metrics.get(name, []))


def snapshot(srv: ServerProc) -> dict:
    """Workers, num_running, health and the relevant metrics in one go."""
    status, body = srv.get("/workers")
    m = parse_metrics(srv.get("/metrics")[1])
    return {
        "workers": body["workers"] if status == 200 else [],
        "num_running": body.get("num_running") if status == 200 else None,
        "health": srv.get("/health")[0],
        "migrated": metric_total(m, "tetri:requests_migrated_total"),
        "restarts": metric_total(m, "tetri:worker_restarts_total"),
        "kv_usage": [v for _, v in m.get("tetri:kv_cache_usage_perc", [])],
    }


def wait_drained(srv: ServerProc, timeout_s: float, want_restarts: dict[int, int] | None = None) -> tuple[bool, dict]:
    """Until nothing runs, every worker is ready (restarted ones included) and every pool is
    empty; returns (reached, last snapshot)."""
    deadline = time.monotonic() + timeout_s
    snap = snapshot(srv)
    while time.monotonic() < deadline:
        ws = snap["workers"]
        restarted = all(next((w["restarts"] for w in ws if w["worker_id"] == wid), 0) >= n
                        for wid, n in (want_restarts or {}).items())
        if (snap["num_running"] == 0 and ws and all(w["state"] == "ready" for w in ws)
                and all(w["kv_blocks_used"] == 0 for w in ws) and restarted and snap["health"] == 200):
            return True, snap
        time.sleep(0.25)
        snap = snapshot(srv)
    return False, snap


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def reference_outputs(plans: list[Plan], model_dir: str | None = None, chunk_size: int = 256) -> list[list[int]]:
    """Greedy outputs of the offline engine for the same prompts and lengths."""
    from tetri import LLM, SamplingParams

    llm = LLM(model_dir, chunk_size=chunk_size)
    try:
        outs = llm.generate([p.prompt for p in plans],
                            [SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True) for p in plans])
        return [list(o.token_ids) for o in outs]
    finally:
        llm.close()


def start_reference(plans: list[Plan], workdir: str):
    """Compute `reference_outputs` in a niced child process (this script with --reference-*),
    so the offline engine runs while the load does; `finish_reference` collects it."""
    import subprocess

    src, dst = os.path.join(workdir, "chaos-ref-in.json"), os.path.join(workdir, "chaos-ref-out.json")
    Path(src).write_text(json.dumps([[p.prompt, p.max_tokens] for p in plans]))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--reference-in", src, "--reference-out", dst],
                            preexec_fn=lambda: os.nice(10), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, dst


def finish_reference(handle, timeout_s: float = 600.0) -> list[list[int]]:
    proc, dst = handle
    _, err = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(Path(dst).read_text())


def first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# ---- the run ---------------------------------------------------------------------------------


def _busy(w: dict) -> int:
    """How much work a worker is in the middle of: decode: running requests; prefill: prompts
    being prefilled and queued chunk tokens (not the finished prompts it only holds)."""
    if w["role"] == "decode":
        return w["running"]
    return w["running"] + w.get("queued_prefill_tokens", 0)


async def _kill(srv_url: str, session, role: str, kills: list, started: int, t0: float,
                wait_busy_s: float = 5.0, min_busy: int = 1) -> None:
    """SIGKILL the busiest worker of `role` as soon as one is in the middle of work (`_busy` >=
    `min_busy`), waiting at most `wait_busy_s` (i.e. into the next wave of arrivals)."""
    t_trigger = time.monotonic()
    deadline = t_trigger + wait_busy_s
    victim = None
    while True:
        async with session.get(srv_url + "/workers") as r:
            rows = (await r.json())["workers"]
        cands = [w for w in rows if w["role"] == role and w["state"] == "ready" and w["pid"]]
        if cands:
            victim = max(cands, key=lambda w: (_busy(w), -w["worker_id"]))
            if _busy(victim) >= min_busy or time.monotonic() > deadline:
                break
        elif time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    if victim is None:
        kills.append({"role": role, "error": "no live worker of that role to kill", "after_started": started})
        return
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        ok = True
    except ProcessLookupError:
        ok = False
    kills.append({"role": role, "worker_id": victim["worker_id"], "pid": victim["pid"], "killed": ok,
                  "running_at_kill": victim["running"], "waiting_at_kill": victim["waiting"],
                  "queued_tokens_at_kill": victim.get("queued_prefill_tokens", 0),
                  "after_started": started, "at_s": round(time.monotonic() - t0, 2),
                  "waited_busy_s": round(time.monotonic() - t_trigger, 2)})


async def run_load(srv: ServerProc, model: str, plans: list[Plan], *, concurrency: int, duration_s: float,
                   deadline_s: float, kill_decode_at: float | None,
                   kill_prefill_at: float | None) -> tuple[list[Outcome], list]:
    n = len(plans)
    kills: list = []
    triggers = []
    if kill_decode_at is not None:
        triggers.append((max(1, math.ceil(kill_decode_at * n)), "decode"))
    if kill_prefill_at is not None:
        triggers.append((max(1, math.ceil(kill_prefill_at * n)), "prefill"))
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    t0 = time.monotonic()
    # arrivals come in waves of `concurrency` (so that many really are in flight at once, well
    # past one chunk), the waves spread over duration_s
    waves = max(1, math.ceil(n / concurrency))
    gap = duration_s / waves
    jitter = random.Random(n)
    starts = sorted((i // concurrency) * gap + jitter.uniform(0, 0.1 * gap) for i in range(n))
    outcomes: list[Outcome | None] = [None] * n
    side_tasks = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(plan: Plan) -> None:
            try:
                outcomes[plan.idx] = await stream_request(session, srv.base_url, model, plan, deadline_s)
            finally:
                sem.release()

        tasks = []
        for i, plan in enumerate(plans):
            await asyncio.sleep(max(0.0, t0 + starts[i] - time.monotonic()))
            await sem.acquire()
            tasks.append(asyncio.create_task(one(plan)))
            for at, role in triggers:
                if i + 1 == at:
                    # a decode victim running several requests, so some surely migrate
                    min_busy = 2 if role == "decode" and concurrency >= 4 else 1
                    side_tasks.append(asyncio.create_task(_kill(srv.base_url, session, role, kills, i + 1, t0,
                                                                wait_busy_s=max(5.0, 1.5 * gap),
                                                                min_busy=min_busy)))
        await asyncio.gather(*tasks, *side_tasks)
    return [o for o in outcomes if o is not None], kills


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--duration-s", type=float, default=75.0, help="request starts are spread over this long")
    ap.add_argument("--disconnect-frac", type=float, default=0.2)
    ap.add_argument("--kill-decode-at", type=float, default=0.3, help="fraction of requests started; <0: never")
    ap.add_argument("--kill-prefill-at", type=float, default=0.6, help="fraction of requests started; <0: never")
    ap.add_argument("--request-deadline-s", type=float, default=120.0)
    ap.add_argument("--deadline-per-startup", type=float, default=0.0,
                    help="raise the request deadline to this many times the measured server start-up "
                         "(a worker restart loads the model again), so a slow machine is not read as a hang")
    ap.add_argument("--drain-timeout-s", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompt", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-arg", action="append", default=[], help="extra tetri-serve flag (repeatable)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the offline-engine comparison")
    ap.add_argument("--reference-in", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reference-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference_in:  # child mode of start_reference
        items = json.loads(Path(args.reference_in).read_text())
        out = reference_outputs([Plan(i, p, m) for i, (p, m) in enumerate(items)])
        Path(args.reference_out).write_text(json.dumps(out))
        return {"reference": len(out), "ok": True}

    plans = make_plans(args.requests, args.seed, args.disconnect_frac, max_prompt=args.max_prompt,
                       max_tokens=args.max_tokens)
    t_start = time.monotonic()
    srv = ServerProc(*SERVER_ARGS, *args.server_arg).start()
    startup_s = time.monotonic() - t_start
    deadline_s = max(args.request_deadline_s, args.deadline_per_startup * startup_s)
    report: dict = {"server_args": [*SERVER_ARGS, *args.server_arg], "server_log": srv.log.name,
                    "startup_s": round(startup_s, 1), "request_deadline_s": round(deadline_s, 1)}
    exit_code = None
    probe = Plan(-1, [7, 8, 9, 10, 11], 12)  # one more request once the workers are back
    workdir = tempfile.mkdtemp(prefix="tetri-chaos-")
    ref_job = None if args.no_reference else start_reference(plans + [probe], workdir)
    try:
        model = srv.openai().models.list().data[0].id
        before = {w["worker_id"]: w for w in srv.workers()}
        t_load = time.monotonic()
        outcomes, kills = asyncio.run(run_load(
            srv, model, plans, concurrency=args.concurrency, duration_s=args.duration_s,
            deadline_s=deadline_s,
            kill_decode_at=args.kill_decode_at if args.kill_decode_at >= 0 else None,
            kill_prefill_at=args.kill_prefill_at if args.kill_prefill_at >= 0 else None))
        report["load_s"] = round(time.monotonic() - t_load, 1)
        want = {k["worker_id"]: before[k["worker_id"]]["restarts"] + 1 for k in kills if k.get("killed")}
        t_drain = time.monotonic()
        drained, snap = wait_drained(srv, args.drain_timeout_s, want)
        report["drain_s"] = round(time.monotonic() - t_drain, 1)
        live = [w for w in snap["workers"] if w["state"] != "dead"]
        # one more request after the restarts: the healed server still gives the right tokens
        async def _probe():
            async with aiohttp.ClientSession() as s:
                return await stream_request(s, srv.base_url, model, probe, 60.0)

        post = asyncio.run(_probe())
        report.update({
            "drained": drained,
            "num_running_after": snap["num_running"],
            "leaked_blocks": sum(w["kv_blocks_used"] for w in live),
            "kv_usage_after": max(snap["kv_usage"], default=0.0),
            "migrated": int(snap["migrated"]),
            "restarts": int(snap["restarts"]),
            "healthy_at_end": bool(drained and snap["health"] == 200 and len(live) == len(snap["workers"])
                                   and all(w["state"] == "ready" and pid_alive(w["pid"]) for w in live)),
            "workers_at_end": [{k: w[k] for k in ("worker_id", "role", "pid", "state", "kv_blocks_used",
                                                  "restarts")} for w in snap["workers"]],
            "kills": kills,
        })
    except BaseException:
        if ref_job is not None:
            ref_job[0].kill()
            ref_job[0].wait()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        t_stop = time.monotonic()
        exit_code = srv.stop()
        report["stop_s"] = round(time.monotonic() - t_stop, 1)
    report["server_exit_code"] = exit_code

    by = {s: [o for o in outcomes if o.status == s] for s in ("completed", "errored", "cancelled", "hung")}
    report.update({
        "sent": len(plans),
        "completed": len(by["completed"]),
        "errored": len(by["errored"]),
        "cancelled": len(by["cancelled"]),
        "hung": len(by["hung"]),
        "refused_attempts": sum(o.refused for o in outcomes),
        "disconnects_planned": sum(p.disconnect_after is not None for p in plans),
    })
    kinds: dict[str, int] = {}
    for o in by["errored"] + by["hung"]:
        key = (o.error or "?")[:100]
        kinds[key] = kinds.get(key, 0) + 1
    report["error_kinds"] = kinds

    if args.no_reference:
        shutil.rmtree(workdir, ignore_errors=True)
        report["mismatches"] = report["prefix_mismatches"] = None
    else:
        t_ref = time.monotonic()
        try:
            want_tokens = finish_reference(ref_job)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        report["reference_wait_s"] = round(time.monotonic() - t_ref, 1)
        ref, probe_ref = want_tokens[:-1], want_tokens[-1]
        mism, pmism = [], []
        for o in outcomes:
            exp = ref[o.idx]
            if o.status == "completed":
                if o.tokens != exp:
                    mism.append({"idx": o.idx, "got_len": len(o.tokens), "want_len": len(exp),
                                 "first_diff": first_diff(o.tokens, exp)})
            elif o.tokens and o.tokens != exp[:len(o.tokens)]:
                pmism.append({"idx": o.idx, "status": o.status, "got_len": len(o.tokens),
                              "first_diff": first_diff(o.tokens, exp)})
        report["mismatches"] = len(mism)
        report["prefix_mismatches"] = len(pmism)
        report["mismatch_detail"] = (mism + pmism)[:10]
        report["post_restart_request_ok"] = post.status == "completed" and post.tokens == probe_ref
    report["total_s"] = round(time.monotonic() - t_start, 1)
    report["ok"] = bool(
        report["hung"] == 0 and report["leaked_blocks"] == 0 and report["kv_usage_after"] == 0
        and report["healthy_at_end"]
        and report["completed"] + report["errored"] + report["cancelled"] == report["sent"]
        and report["migrated"] >= (1 if args.kill_decode_at >= 0 else 0)
        and not report["mismatches"] and not report["prefix_mismatches"] and report["server_exit_code"] == 0
        and report.get("post_restart_request_ok", True)
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    rep = main()
    print(json.dumps(rep, indent=2))
    raise SystemExit(0 if rep["ok"] else 1)
