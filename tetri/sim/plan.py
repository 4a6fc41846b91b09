"""`tetri-plan`: search placements and policies with the simulator (DistServe-style).

For each candidate (colocated-chunked with a chunk size; tetri with a prefill:decode split,
a chunk size and a decode policy) it finds the highest Poisson rate whose SLO attainment is
at least 90% (DistServe's goodput): bracket by doubling/halving from a cost-model estimate,
then bisect to 15%. Or, with --rates, it evaluates exactly those rates. Goodput per GPU =
that rate / GPUs. The search is staged to stay within --max-sims simulated runs (a count,
not seconds, so the pick does not depend on how loaded the machine is: the same flags give
the same pick):
  1. colocated-chunked at chunk 512, then tetri at every split 1..gpus-1 (chunk 512,
     reserve-dynamic), nearest first to the split that balances the cost model's prefill
     and decode GPU-seconds;
  2. the other chunk sizes for colocated-chunked and the two best splits;
  3. the other decode policies for the best tetri placement.
After the first candidate, each one is first run at the best rate so far; if it misses 90%
there it cannot win and is not searched further (it is ranked by that attainment). Every run reuses the same request lengths and
arrival pattern (Poisson arrivals at rate 1, divided by the rate). A run at rate R holds
R * --window-s requests (at least --num-requests, at most --max-requests): a fixed count
would let a fast enough burst pass any SLO, so the run must last long enough for an
overload to show.

    tetri-plan --workload lphd --slo ttft=1,tpot=0.05 --gpus 8 --model-preset llama3-8b --hardware h200
    tetri-plan --workload mixed --slo ttft=1,tpot=0.05 --slo ttft=1,tpot=0.025 ...   (both SLOs, DistServe-style)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tetri.bench.records import Slo
from tetri.bench.workload import Request
from tetri.sched.decode_registry import DECODE_POLICIES
from tetri.sim.cli import _floats, _positive_float, _slo, add_cluster_args, add_workload_args, build_requests
from tetri.sim.cli import cost_model_from_args
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import CostModel
from tetri.sim.simulator import sim_report, simulate

ATTAINMENT_TARGET = 0.9
BISECT_RATIO = 1.15
MAX_BRACKET_STEPS = 8
DEFAULT_MAX_SIMS = 300
"""Simulated runs per search (per SLO): the deterministic cap that replaced a wall-clock budget."""


@dataclass(frozen=True)
class Candidate:
    mode: str  # colocated-chunked | tetri
    chunk_size_tokens: int
    num_prefill: int | None = None
    num_decode: int | None = None
    decode_policy: str = "greedy"

    def label(self) -> str:
        if self.mode == "tetri":
            return f"tetri {self.num_prefill}P:{self.num_decode}D chunk {self.chunk_size_tokens} {self.decode_policy}"
        return f"{self.mode} chunk {self.chunk_size_tokens}"

    def roles(self, gpus: int) -> list[str]:
        """The workers' roles this placement starts with (`tetri-serve --mode auto`)."""
        if self.mode == "tetri":
            return ["prefill"] * self.num_prefill + ["decode"] * self.num_decode
        return ["mixed"] * gpus

    def serve_command(self, gpus: int) -> str:
        """The tetri-serve command line that runs this placement."""
        head = f"tetri-serve --gpus 0-{gpus - 1}" if gpus > 1 else "tetri-serve --gpus 0"
        if self.mode == "tetri":
            return (f"{head} --prefill {self.num_prefill} --decode {self.num_decode} --chunk-size "
                    f"{self.chunk_size_tokens} --dispatch-policy tetri --decode-policy {self.decode_policy} "
                    f"--mode disagg")
        return f"{head} --chunk-size {self.chunk_size_tokens} --mode colocated"


@dataclass
class Evaluation:
    candidate: Candidate
    max_rate: float | None
    """Highest rate meeting the target found; None: none (or pruned below `floor`)."""
    pruned: bool = False
    attainment: dict[float, float] = field(default_factory=dict)

    def goodput_per_gpu(self, gpus: int) -> float | None:
        return None if self.max_rate is None else self.max_rate / gpus


class Search:
    def __init__(self, base_reqs: list[Request], cost: CostModel, slo: Slo, gpus: int, budget_s: float | None = None,
                 target: float = ATTAINMENT_TARGET, window_s: float = 8.0, min_requests: int = 200,
                 max_sims: int = DEFAULT_MAX_SIMS, mode_costs: dict[str, CostModel] | None = None,
                 **sim_fields) -> None:
        """`base_reqs`: Poisson arrivals at rate 1 (the most any run uses); `sim_fields`:
        further SimConfig fields every candidate shares (seed, num_blocks, ...). The search
        stops after `max_sims` simulated runs (deterministic). `budget_s` (default None: off)
        adds a wall-clock stop as well; with it the pick can depend on the machine's load.
        `mode_costs`: a cost model per candidate mode (a calibration's serving latencies
        measured for that deployment, see `mode_costs_from_args`); `cost` for the others."""
        self.base_reqs = base_reqs
        self.mode_costs = dict(mode_costs or {})
        self.window_s = window_s
        self.min_requests = min_requests
        self.capped_rates: set[float] = set()
        self.cost = cost
        self.slo = slo
        self.gpus = gpus
        self.target = target
        self.sim_fields = sim_fields
        if max_sims < 1:
            raise ValueError("max_sims must be >= 1")
        self.max_sims = max_sims
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.sims = 0
        self.results: list[Evaluation] = []

    @property
    def out_of_time(self) -> bool:
        """The search must stop: `max_sims` runs done (or the optional wall-clock budget spent)."""
        return self.sims >= self.max_sims or (self.deadline is not None and time.monotonic() > self.deadline)

    def config(self, cand: Candidate) -> SimConfig:
        return SimConfig(mode=cand.mode, num_gpus=self.gpus, num_prefill=cand.num_prefill,
                         num_decode=cand.num_decode, chunk_size_tokens=cand.chunk_size_tokens,
                         decode_policy=cand.decode_policy, **self.sim_fields)

    def requests_at(self, rate: float) -> list[Request]:
        n = max(self.min_requests, int(rate * self.window_s + 0.5))
        if n > len(self.base_reqs):
            self.capped_rates.add(rate)
        return [Request(r.prompt_tokens, r.output_tokens, (r.arrival_s or 0.0) / rate) for r in self.base_reqs[:n]]

    def attainment(self, cand: Candidate, rate: float, ev: Evaluation) -> float:
        reqs = self.requests_at(rate)
        cost = self.mode_costs.get(cand.mode, self.cost)
        result = simulate(reqs, self.config(cand), cost, early_stop=(self.slo, self.target))
        self.sims += 1
        ev.attainment[rate] = sim_report(result, self.slo)["slo_attainment"]
        return ev.attainment[rate]

    def _phase_s(self) -> tuple[float, float]:
        """GPU-seconds one average request spends in prefill and in decode (batch 64)."""
        n = len(self.base_reqs)
        prompt = sum(r.prompt_tokens for r in self.base_reqs) / n
        output = sum(r.output_tokens for r in self.base_reqs) / n
        batch = 64
        per_decode_token_s = self.cost.decode_s(batch, int(batch * (prompt + output / 2))) / batch
        return prompt * self.cost.prefill_s([512]) / 512, output * per_decode_token_s

    def estimate_rate(self) -> float:
        """Cluster rate at which the GPUs would be about half busy (a starting point only)."""
        return 0.5 * self.gpus / sum(self._phase_s())

    def split_order(self) -> list[int]:
        """Prefill worker counts 1..gpus-1, nearest first to the cost-balanced split."""
        prefill_s, decode_s = self._phase_s()
        ideal = self.gpus * prefill_s / (prefill_s + decode_s)
        return sorted(range(1, self.gpus), key=lambda p: (abs(p - ideal), p))

    def _bracket(self, cand: Candidate, start: float, ev: Evaluation) -> tuple[float | None, float]:
        """(highest passing rate seen or None, lowest failing rate seen)."""
        if self.attainment(cand, start, ev) >= self.target:
            lo = start
            for _ in range(MAX_BRACKET_STEPS):
                if self.out_of_time or self.attainment(cand, lo * 2, ev) < self.target:
                    return lo, lo * 2
                lo *= 2
            return lo, float("inf")
        hi = start
        for _ in range(MAX_BRACKET_STEPS):
            if self.out_of_time:
                break
            if self.attainment(cand, hi / 2, ev) >= self.target:
                return hi / 2, hi
            hi /= 2
        return None, hi

    def max_rate(self, cand: Candidate, start: float, floor: float | None = None) -> Evaluation:
        ev = Evaluation(cand, None)
        self.results.append(ev)
        if floor is not None and self.attainment(cand, floor, ev) < self.target:
            ev.pruned = True
            return ev
        lo, hi = self._bracket(cand, floor or start, ev)
        while lo is not None and hi != float("inf") and hi / lo > BISECT_RATIO and not self.out_of_time:
            mid = (lo * hi) ** 0.5
            if self.attainment(cand, mid, ev) >= self.target:
                lo = mid
            else:
                hi = mid
        ev.max_rate = lo
        return ev

    def at_rates(self, cand: Candidate, rates: list[float]) -> Evaluation:
        ev = Evaluation(cand, None)
        self.results.append(ev)
        for rate in sorted(rates):
            if self.out_of_time:
                break
            if self.attainment(cand, rate, ev) >= self.target:
                ev.max_rate = rate
        return ev

    def best(self, mode: str | None = None) -> Evaluation | None:
        done = [e for e in self.results if e.max_rate is not None and (mode is None or e.candidate.mode == mode)]
        return max(done, key=lambda e: e.max_rate, default=None)


def _evaluate(search: Search, cand: Candidate, rates: list[float] | None, staged: bool) -> None:
    if search.out_of_time or any(e.candidate == cand for e in search.results):
        return
    if rates:
        search.at_rates(cand, rates)
        return
    best = search.best()
    start = best.max_rate if best is not None else search.estimate_rate()
    search.max_rate(cand, start, floor=best.max_rate if (staged and best is not None) else None)


def _rank_key(ev: Evaluation) -> tuple[float, float]:
    return (ev.max_rate or 0.0, max(ev.attainment.values(), default=0.0))


def run_search(search: Search, chunk_sizes: list[int], decode_policies: list[str],
               rates: list[float] | None = None) -> Search:
    gpus, base_chunk = search.gpus, 512 if 512 in chunk_sizes else chunk_sizes[0]
    first_policy = decode_policies[0]
    _evaluate(search, Candidate("colocated-chunked", base_chunk), rates, staged=False)
    for p in search.split_order():
        _evaluate(search, Candidate("tetri", base_chunk, p, gpus - p, first_policy), rates, staged=True)
    tetri = sorted((e for e in search.results if e.candidate.mode == "tetri"), key=_rank_key, reverse=True)[:2]
    for chunk in chunk_sizes:
        _evaluate(search, Candidate("colocated-chunked", chunk), rates, staged=True)
        for ev in tetri:
            c = ev.candidate
            _evaluate(search, Candidate("tetri", chunk, c.num_prefill, c.num_decode, first_policy), rates, True)
    best = search.best("tetri")
    if best is not None:
        c = best.candidate
        for policy in decode_policies[1:]:
            _evaluate(search, Candidate("tetri", c.chunk_size_tokens, c.num_prefill, c.num_decode, policy),
                      rates, staged=True)
    return search


SERVING_MODES = {"colocated-chunked": ("colocated-chunked", "colocated"), "tetri": ("tetri", "disagg")}
"""Candidate mode -> the `serving[...]` fits of a calibration (`tetri-sim fit-serving --mode`)
that measured that deployment live, first found wins."""


def mode_costs_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, CostModel]:
    """With --calibration: per candidate mode, the cost model with the serving latencies the
    calibration holds for that mode (the live server's own overheads, which differ between
    deployments: on a shared CPU host two mixed workers' prompt chunks slow each other's
    steps, a prefill + decode pair much less). Modes without a fit use the bare engine."""
    if not args.calibration:
        return {}
    serving = json.loads(Path(args.calibration).read_text()).get("serving", {})
    out = {}
    for mode, keys in SERVING_MODES.items():
        key = next((k for k in keys if k in serving), None)
        if key is not None:
            out[mode] = cost_model_from_args(argparse.Namespace(**{**vars(args), "mode": key}), parser)
    return out


def plan_search(args: argparse.Namespace, parser: argparse.ArgumentParser, slo: Slo, chunk_sizes: list[int],
                decode_policies: list[str]) -> Search:
    """One search for `slo` from parsed tetri-plan flags (what `main` runs per --slo)."""
    min_requests = args.num_requests
    cost = cost_model_from_args(args, parser)
    base_reqs = build_requests(argparse.Namespace(**{**vars(args), "num_requests": max(min_requests, args.max_requests)}),
                               rate=1.0)
    search = Search(base_reqs, cost, slo, args.gpus, args.budget_s, args.attainment, args.window_s, min_requests,
                    max_sims=args.max_sims, mode_costs=mode_costs_from_args(args, parser), seed=args.seed,
                    num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs, block_size=args.block_size, max_batched_tokens=args.max_batched_tokens, max_sim_s=args.max_sim_s)
    return run_search(search, sorted(set(chunk_sizes)), decode_policies, args.rates)


START_FLAGS = ("--workload", "mixed", "--num-requests", "100", "--max-requests", "400", "--window-s", "4",
               "--max-sims", "24", "--chunk-sizes", "512", "--decode-policies", "greedy")
"""tetri-serve --mode auto's default search (extra `--plan-flags` come after and win): small
and deterministic (a capped number of simulated runs)."""


@dataclass(frozen=True)
class PlanStart:
    roles: list[str]
    label: str
    """The placement picked (Candidate.label), or why none was."""
    max_rate: float | None
    simulations: int


def plan_start(workers: int, slo: Slo, flags: Sequence[str] = ()) -> PlanStart:
    """Initial roles for `workers` from tetri-plan's pick for `slo` (tetri-serve --mode auto).
    `flags`: further tetri-plan flags (workload or trace, --model-preset, --hardware,
    --calibration, --max-sims ...). When no candidate meets the SLO at any rate tried, the one
    with the best attainment is used. Deterministic: the same arguments, the same roles."""
    if workers < 2:
        raise ValueError("tetri-plan needs at least 2 workers")
    flags = list(flags)
    base = list(START_FLAGS)
    if "--trace" in flags:  # a trace instead of the default workload (argparse: one or the other)
        del base[0:2]
    parser = build_parser()
    args = parser.parse_args(["--gpus", str(workers), "--slo", _slo_text(slo) or "ttft=1e9", *base, *flags])
    search = plan_search(args, parser, slo, args.chunk_sizes, args.decode_policies)
    best = search.best() or max(search.results, key=_rank_key, default=None)
    if best is None:
        return PlanStart(["mixed"] * workers, "no candidate simulated: colocated", None, search.sims)
    return PlanStart(best.candidate.roles(workers), best.candidate.label(), best.max_rate, search.sims)


def render(search: Search) -> str:
    gpus = search.gpus
    rows = sorted(search.results, key=lambda e: -(e.max_rate or 0.0))
    lines = [f"{'candidate':<48} {'max rate @90% (req/s)':>22} {'goodput/GPU':>12} {'runs':>5}"]
    for ev in rows:
        rate = ("< %.3g (pruned)" % max(ev.attainment)) if ev.pruned else (
            "-" if ev.max_rate is None else f"{ev.max_rate:.3g}")
        per_gpu = ev.goodput_per_gpu(gpus)
        lines.append(f"{ev.candidate.label():<48} {rate:>22} {'-' if per_gpu is None else f'{per_gpu:.3g}':>12} "
                     f"{len(ev.attainment):>5}")
    best = search.best()
    if best is None:
        lines.append("no candidate met the SLO at any rate tried")
    else:
        lines.append(f"best: {best.candidate.label()}: {best.max_rate:.3g} req/s "
                     f"({best.goodput_per_gpu(gpus):.3g} req/s per GPU)")
        lines.append(best.candidate.serve_command(gpus))
    lines.append(f"{search.sims} simulations" + ("; stopped at the cap (--max-sims/--budget-s)" if search.out_of_time
                                                  else ""))
    if search.capped_rates:
        lines.append(f"note: runs at >= {min(search.capped_rates):.3g} req/s used every one of the "
                     f"{len(search.base_reqs)} requests (--max-requests), i.e. under {search.window_s:g} s of arrivals")
    return "\n".join(lines)


def to_json(search: Search) -> dict:
    best = search.best()
    return {"gpus": search.gpus, "slo": search.slo.to_dict(), "target_attainment": search.target,
            "simulations": search.sims, "out_of_time": search.out_of_time,
            "candidates": [{**asdict(e.candidate), "label": e.candidate.label(), "max_rate": e.max_rate,
                            "goodput_per_gpu": e.goodput_per_gpu(search.gpus), "pruned": e.pruned,
                            "attainment": {f"{r:.6g}": a for r, a in sorted(e.attainment.items())}}
                           for e in search.results],
            "best": None if best is None else {**asdict(best.candidate), "max_rate": best.max_rate,
                                               "command": best.candidate.serve_command(search.gpus)}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetri-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    add_cluster_args(p)
    p.set_defaults(num_requests=200)
    p.add_argument("--window-s", type=_positive_float, default=8.0,
                   help="seconds of arrivals per run (requests = rate * window, >= --num-requests)")
    p.add_argument("--max-requests", type=int, default=5000, help="cap on requests per run")
    p.add_argument("--slo", type=_slo, required=True, action="append",
                   help="ttft=SECONDS,tpot=SECONDS; give it twice (e.g. tpot=0.05 and tpot=0.025) for one search each")
    p.add_argument("--rates", type=_floats, help="evaluate only these cluster rates (req/s), no bisection")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--decode-policies", nargs="+", choices=DECODE_POLICIES,
                   default=["reserve-dynamic", "reserve-static", "greedy"])
    p.add_argument("--attainment", type=float, default=ATTAINMENT_TARGET)
    p.add_argument("--max-sims", type=int, default=DEFAULT_MAX_SIMS,
                   help="simulated runs per search (per --slo): a deterministic cap, the same pick on any machine")
    p.add_argument("--budget-s", type=_positive_float, default=None,
                   help="optional wall-clock cap as well (off by default: with it the pick depends on machine load)")
    p.add_argument("--json", dest="json_path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpus < 2:
        parser.error("tetri-plan needs --gpus >= 2 (a split needs a prefill and a decode worker)")
    if min(args.chunk_sizes) < 1 or not 0 < args.attainment <= 1 or args.max_sims < 1:
        parser.error("chunk sizes and --max-sims must be >= 1 and --attainment in (0, 1]")
    min_requests = args.num_requests
    try:
        cost = cost_model_from_args(args, parser)
        mode_costs = mode_costs_from_args(args, parser)
        args.num_requests = max(args.num_requests, args.max_requests)
        base_reqs = build_requests(args, rate=1.0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tetri-plan: error: {exc}", file=sys.stderr)
        return 2
    searches = []
    for slo in args.slo:  # one search per declared SLO (e.g. TPOT 50 ms and 25 ms), each its own budget
        search = Search(base_reqs, cost, slo, args.gpus, args.budget_s, args.attainment, args.window_s,
                        min_requests, max_sims=args.max_sims, mode_costs=mode_costs, seed=args.seed,
                        num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                        max_batched_tokens=args.max_batched_tokens, max_sim_s=args.max_sim_s)
        run_search(search, sorted(set(args.chunk_sizes)), args.decode_policies, args.rates)
        if len(args.slo) > 1:
            print(f"== SLO {_slo_text(slo)}")
        print(render(search))
        searches.append(search)
    if args.json_path:
        doc = to_json(searches[0])
        if len(searches) > 1:
            doc["by_slo"] = [to_json(s) for s in searches]
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(s.best() is not None for s in searches) else 1


def _slo_text(slo: Slo) -> str:
    return ",".join(f"{k}={v:g}" for k, v in (("ttft", slo.ttft_s), ("tpot", slo.tpot_s)) if v != float("inf"))


if __name__ == "__main__":
    sys.exit(main())
