"""The whole server on one GPU, both modes, and the KV handoff measured, in one run.

    python tools/gpu_serve_check.py --model-dir DIR --json out.json   # GPU machine (tools/gpu_check.sh)
    python tools/gpu_serve_check.py --cpu-smoke                       # CPU, tiny sizes (the suite runs it)

Sections (each stops early, saying so, when --budget-s runs out):
- handoff (tools/bench_kv_transfer.py): the 8B layout's blocks of one prompt of 128 ... 8192
  tokens copied from a pool another process owns, through CUDA IPC and host-staged (shm and
  host-staged on CPU), against a raw device-to-device copy of the same bytes;
- offline: the offline engine's greedy tokens for the check prompts (in a child process, so the
  GPU is free again for the servers);
- serve, per mode (`--gpus 0 --prefill-gpus 0 --decode-gpus 0`, and `--mode colocated --gpus 0`):
  the official openai SDK: greedy one at a time (must equal the offline engine), the same
  concurrently (counted; their handoffs find the prompts' blocks in the decode worker's prefix
  cache and copy only the rest: `handoff_blocks`), streaming (must equal non-streaming), n=2 greedy (both choices equal),
  sampled with a seed (same twice), clients leaving mid-stream; then every block free
  (/workers), the transfer path per pair, and tetri-bench on a mixed workload;
- the two modes' TTFT, TPOT p99 and goodput side by side.
The GPU run needs the 8B-shaped random bf16 checkpoint (tools/gpu_bench.py --model-dir writes
it; this tool adds a word-level tokenizer covering its 128256 ids) and the traces
(TETRI_TRACES_DIR; tools/fetch_gpu_wheels.sh copies the few it needs). Estimate on one H200,
never measured (no GPU was available to the project): about 3.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.runtime.server_proc import ServerProc  # noqa: E402
from tools.bench_kv_transfer import LAYOUT_8B, LAYOUT_SMALL, bench_handoff  # noqa: E402

PROMPTS = [[3 + (7 * i + j) % 300 for j in range(n)] for i, n in enumerate((5, 37, 130, 600))]


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Plan:
    """Sizes per run kind."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda:0"
        self.layout = LAYOUT_SMALL if smoke else LAYOUT_8B
        self.lengths = [128, 512] if smoke else [128, 512, 2048, 8192]
        self.repeats = 2 if smoke else 5
        self.paths = ("shm", "host_staged") if smoke else ("cuda_ipc", "host_staged")
        self.max_tokens = 6 if smoke else 16
        self.copies = 1 if smoke else 4  # each check prompt this many times at once
        self.leavers = 3 if smoke else 8  # clients that leave mid-stream
        self.prompts = PROMPTS[:2] if smoke else PROMPTS
        self.modes = {"disagg": ["--prefill", "1", "--decode", "1"], "colocated": ["--mode", "colocated", "--workers", "1"]} \
            if smoke else {"disagg": ["--gpus", "0", "--prefill-gpus", "0", "--decode-gpus", "0"],
                           "colocated": ["--mode", "colocated", "--gpus", "0"]}
        common = ["--device", "cpu", "--chunk-size", "64"] if smoke else [
            "--chunk-size", "512", "--max-num-seqs", "64", "--gpu-memory-utilization", "0.85", "--dtype", "bfloat16"]
        self.server_args = common
        self.bench = (["--workload", "random", "--num-requests", "6", "--rate", "4", "--max-prompt-tokens", "64",
                       "--max-output-tokens", "8", "--vocab-size", "300", "--slo", "ttft=5,tpot=1"] if smoke else
                      ["--workload", "mixed", "--num-requests", "48", "--rate", "4", "--max-prompt-tokens", "4096",
                       "--max-output-tokens", "256", "--vocab-size", "128000", "--slo", "ttft=1,tpot=0.05"])


# ---- offline reference -----------------------------------------------------------------


def _offline_main(conn, model_dir: str, plan_smoke: bool) -> None:
    from tetri import LLM, SamplingParams

    plan = Plan(plan_smoke)
    kw = dict(device="cpu", chunk_size=64) if plan.smoke else dict(device="cuda", dtype="bfloat16", chunk_size=512,
                                                                   enforce_eager=True, num_blocks=2048)
    llm = LLM(model_dir, **kw)
    params = SamplingParams(max_tokens=plan.max_tokens, temperature=0.0, ignore_eos=True)
    conn.send([llm.generate([p], params)[0].token_ids for p in plan.prompts])  # one at a time, like the check
    llm.close()


def offline_tokens(model_dir: str, plan: Plan) -> list[list[int]]:
    import multiprocessing as mp

    if plan.smoke:  # CPU: no device memory to give back, so no child process
        conn, child = mp.Pipe()
        _offline_main(child, model_dir, True)
        return conn.recv()
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_offline_main, args=(child, model_dir, plan.smoke), daemon=True)
    proc.start()
    if not conn.poll(600):
        proc.kill()
        raise TimeoutError("the offline engine did not answer")
    out = conn.recv()
    proc.join(60)
    return out


# ---- the server ------------------------------------------------------------------------


def _ids(choice) -> list[int]:
    return getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids") or []


def drive(srv: ServerProc, plan: Plan, expected: list[list[int]]) -> dict:
    """The openai SDK against a live server; a dict of checks (True = passed) and counts."""
    import concurrent.futures as cf

    client = srv.openai(timeout=300)
    model = client.models.list().data[0].id
    extra = {"ignore_eos": True, "return_token_ids": True}

    def greedy(prompt, **kw):
        return client.completions.create(model=model, prompt=prompt, max_tokens=plan.max_tokens, temperature=0.0,
                                         extra_body=extra, **kw)

    out = {}
    one_by_one = [_ids(greedy(p).choices[0]) for p in plan.prompts]
    out["greedy_equals_offline"] = one_by_one == expected
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _ids(greedy(p).choices[0]), plan.prompts * plan.copies))
    out["concurrent_equal_to_offline"] = sum(a == b for a, b in zip(together, expected * plan.copies))
    out["concurrent_total"] = len(together)
    streamed = []
    for chunk in greedy(plan.prompts[1], stream=True):
        for ch in chunk.choices:
            streamed.extend(_ids(ch))
    out["stream_equals_offline"] = streamed == expected[1]
    n2 = greedy(plan.prompts[1], n=2)
    out["n2_both_equal_offline"] = [_ids(c) for c in sorted(n2.choices, key=lambda c: c.index)] == [expected[1]] * 2
    sampled = [client.completions.create(model=model, prompt=plan.prompts[0], max_tokens=plan.max_tokens,
                                         temperature=0.8, seed=7, extra_body=extra) for _ in range(2)]
    out["seeded_sampling_repeats"] = _ids(sampled[0].choices[0]) == _ids(sampled[1].choices[0])
    out["sampled_length"] = len(_ids(sampled[0].choices[0])) == plan.max_tokens
    leave_mid_stream(srv, model, plan)
    out["all_blocks_free"] = srv.wait_idle(timeout_s=60)
    rows = srv.workers()
    out["kv_transfer"] = {str(w["worker_id"]): w.get("kv_transfer") for w in rows if w["role"] == "decode"}
    out["blocks_used_after"] = {str(w["worker_id"]): w["kv_blocks_used"] for w in rows}
    # decode-side prefix caching: the repeated prompts above found their blocks cached there, so
    # those handoffs copied only the rest (on the pair's path: CUDA IPC on the GPU), outputs checked
    out["handoff_blocks"] = {k: sum(w.get(f"handoff_blocks_{k}", 0) for w in rows if w["role"] == "decode")
                             for k in ("copied", "cached")}
    metrics = srv.get("/metrics")[1]
    out["server_handoff"] = _handoff_metrics(metrics)
    return out


def leave_mid_stream(srv: ServerProc, model: str, plan: Plan) -> None:
    """Clients that read a few events and hang up."""
    import http.client

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = {"model": model, "prompt": plan.prompts[i % len(plan.prompts)], "max_tokens": 40 * plan.max_tokens,
                "stream": True, "temperature": 0.0, "ignore_eos": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for _ in range(i % 4):
            resp.readline()
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(plan.leavers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _handoff_metrics(text: str) -> dict:
    vals = {}
    for line in text.splitlines():
        for key in ("tetri:kv_transfer_seconds_sum", "tetri:kv_transfer_seconds_count", "tetri:kv_transfer_bytes_total"):
            if line.startswith(key + " "):
                vals[key] = float(line.split()[-1])
    n = vals.get("tetri:kv_transfer_seconds_count", 0)
    if not n:
        return {}
    secs, nbytes = vals["tetri:kv_transfer_seconds_sum"], vals.get("tetri:kv_transfer_bytes_total", 0.0)
    return dict(handoffs=int(n), mean_ms=secs / n * 1e3, GBps=nbytes / secs / 1e9 if secs else None)


def run_bench(srv: ServerProc, plan: Plan) -> dict:
    from tetri.bench.cli import main as bench_main

    path = tempfile.mktemp(suffix=".json")
    bench_main(["--base-url", srv.base_url, *plan.bench, "--json", path, "--no-progress"])
    with open(path) as f:
        r = json.load(f)
    return dict(ttft_p99_s=r["ttft_s"]["p99"], tpot_p99_s=r["tpot_s"]["p99"], ttft_mean_s=r["ttft_s"]["mean"],
                tpot_mean_s=r["tpot_s"]["mean"], goodput=r.get("goodput"), completed=r.get("completed"))


def start_server(flags: list[str], model_dir: str, plan: Plan, budget: Budget) -> ServerProc:
    return ServerProc(*plan.server_args, *flags, "--model", model_dir, ready_timeout_s=max(60.0, budget.left())).start()


def check_mode(srv: ServerProc, plan: Plan, expected, budget: Budget) -> dict:
    result = drive(srv, plan, expected)
    result["bench"] = run_bench(srv, plan) if budget.left() > 30 else "skipped: out of time"
    result["all_blocks_free_after_bench"] = srv.wait_idle(timeout_s=60)
    return result


def serve_modes(model_dir: str, plan: Plan, expected, budget: Budget) -> dict:
    """Each mode's server, one after the other on the GPU (one would not fit beside the other);
    on CPU both start at once (their start-up is the slow part there)."""
    import concurrent.futures as cf

    out = {}
    if plan.smoke:
        with cf.ThreadPoolExecutor(len(plan.modes)) as pool:
            starts = {name: pool.submit(start_server, flags, model_dir, plan, budget) for name, flags in plan.modes.items()}
        servers = {name: f.result() for name, f in starts.items()}
        try:
            for name, srv in servers.items():
                out[name] = check_mode(srv, plan, expected, budget)
        finally:
            for srv in servers.values():
                srv.stop()
        return out
    for name, flags in plan.modes.items():
        if budget.left() < 60:
            out[name] = "skipped: out of time"
            continue
        srv = start_server(flags, model_dir, plan, budget)
        try:
            out[name] = check_mode(srv, plan, expected, budget)
        finally:
            srv.stop()
    return out


# ---- model -----------------------------------------------------------------------------


def ensure_model(model_dir: str | None, smoke: bool) -> str:
    if smoke:
        from tetri.workers.models.default_model import ensure_default_model

        return ensure_default_model()
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        import torch

        spec = _gpu_bench()
        spec.write_checkpoint(model_dir, spec.LLAMA3_8B, torch.bfloat16, torch.device("cuda"))
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        write_word_tokenizer(model_dir, 128256)
    return model_dir


def _gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "tools", "gpu_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_word_tokenizer(out: str, vocab_size: int) -> None:
    """One word per id (`<unk> <s> </s> t3 ... tN`): every id the random model emits decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out)


# ---- main ------------------------------------------------------------------------------


def run(smoke: bool, model_dir: str | None, budget_s: float) -> dict:
    plan, budget = Plan(smoke), Budget(budget_s)
    report: dict = dict(device=plan.device)
    report["handoff"] = bench_handoff(plan.device, plan.layout, plan.lengths, plan.repeats, plan.paths)
    for row in report["handoff"]:
        print("handoff", " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    model_dir = ensure_model(model_dir, smoke)
    expected = offline_tokens(model_dir, plan)
    report["modes"] = serve_modes(model_dir, plan, expected, budget)
    for name, result in report["modes"].items():
        print(name, json.dumps(result), flush=True)
    print_side_by_side(report["modes"])
    return report


def print_side_by_side(modes: dict) -> None:
    names = [n for n, m in modes.items() if isinstance(m, dict) and isinstance(m.get("bench"), dict)]
    if len(names) < 2:
        return
    print(f"{'tetri-bench':<14}" + "".join(f"{n:>14}" for n in names) + f"{'ratio':>9}")
    for key in ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s", "goodput"):
        vals = [modes[n]["bench"][key] for n in names]
        ratio = f"{vals[0] / vals[1]:.2f}x" if vals[1] else "-"
        print(f"{key:<14}" + "".join(f"{_fmt(v):>14}" for v in vals) + f"{ratio:>9}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (the suite runs this)")
    ap.add_argument("--model-dir", default=None, help="the 8B-shaped checkpoint (written here if absent)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip what would not finish in this time")
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not args.model_dir:
        ap.error("--model-dir is required on the GPU")
    report = run(args.cpu_smoke, args.model_dir, args.budget_s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    checks = [v for m in report["modes"].values() if isinstance(m, dict)
              for k, v in m.items() if k in ("greedy_equals_offline", "stream_equals_offline", "n2_both_equal_offline",
                                              "all_blocks_free", "all_blocks_free_after_bench")]
    raise SystemExit(0 if checks and all(checks) else 1)


if __name__ == "__main__":
    main()
