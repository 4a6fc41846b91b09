"""Benchmark report: latency statistics, SLO attainment and goodput, terminal table, PNG plots.

`build_report` is a pure function (no I/O, no HTTP) so the simulator can produce the same
JSON from simulated records. rich and matplotlib are imported only by the functions that
draw, so importing this module costs numpy + msgspec.

Definitions (all over completed requests unless noted):
- ttft_s: send -> first token; e2e_s: send -> end of stream.
- tpot_s: (e2e - ttft) / (output_tokens - 1), requests with more than one output token.
- itl_s: every gap between successive streamed token chunks, pooled over requests.
- slo_attainment (DistServe): requests meeting BOTH ttft <= SLO and tpot <= SLO, divided by
  ALL requests (failed ones count as missing the SLO); goodput = those requests / duration_s.
- Percentiles use numpy's default linear interpolation. Empty statistics are null.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tetri.bench.records import RequestRecord, Slo

__all__ = ["RequestRecord", "Slo", "build_report", "summarize", "sweep_entry", "max_rate_at",
           "print_report", "render_table", "plot_latency_cdfs", "plot_sweep"]

LATENCY_KEYS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
STAT_KEYS = ("mean", "p50", "p90", "p99")
REPORT_KEYS = frozenset({
    "completed", "failed", "duration_s", "request_throughput", "input_token_throughput",
    "output_token_throughput", "mean_prompt_tokens", "mean_output_tokens", *LATENCY_KEYS, "config",
})
SLO_KEYS = frozenset({"slo", "slo_attainment", "goodput"})


def summarize(values: Iterable[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 of the values (None each when there are none)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {k: None for k in STAT_KEYS}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _per_s(amount: float, duration_s: float) -> float:
    return float(amount) / duration_s if duration_s > 0 else 0.0


def build_report(records: Sequence[RequestRecord], duration_s: float, slo: Slo | None = None,
                 config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report for one run. `duration_s`: wall (or simulated) time of the run."""
    done = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    report: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": float(duration_s),
        "request_throughput": _per_s(len(done), duration_s),
        "input_token_throughput": _per_s(prompt_tokens, duration_s),
        "output_token_throughput": _per_s(output_tokens, duration_s),
        "mean_prompt_tokens": prompt_tokens / len(done) if done else None,
        "mean_output_tokens": output_tokens / len(done) if done else None,
        "ttft_s": summarize(r.ttft_s for r in done if r.ttft_s is not None),
        "tpot_s": summarize(t for t in (r.tpot_s for r in done) if t is not None),
        "itl_s": summarize(gap for r in done for gap in r.itl_s),
        "e2e_s": summarize(r.e2e_s for r in done if r.e2e_s is not None),
    }
    if slo is not None:
        met = sum(1 for r in records if slo.met_by(r))
        report["slo"] = slo.to_dict()
        report["slo_attainment"] = met / len(records) if records else 0.0
        report["goodput"] = _per_s(met, duration_s)
    report["config"] = dict(config or {})
    return report


def sweep_entry(rate: float, report: Mapping[str, Any]) -> dict[str, Any]:
    """The per-rate summary kept in a sweep's `sweep` list."""
    keys = ("completed", "failed", "duration_s", "request_throughput", "output_token_throughput",
            "slo_attainment", "goodput", "ttft_s", "tpot_s", "e2e_s")
    return {"rate": rate, **{k: report.get(k) for k in keys}}


def max_rate_at(sweep: Sequence[Mapping[str, Any]], attainment: float = 0.9) -> float | None:
    """Largest swept rate whose SLO attainment is at least `attainment` (None if none)."""
    ok = [e["rate"] for e in sweep if (e.get("slo_attainment") or 0.0) >= attainment]
    return max(ok) if ok else None


# ---------------------------------------------------------------- terminal table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _num(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def render_table(report: Mapping[str, Any]):
    """A rich renderable: run summary plus the latency table (milliseconds)."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title="tetri-bench", show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    rows = [
        ("completed / failed", f"{report['completed']} / {report['failed']}"),
        ("duration (s)", _num(report["duration_s"])),
        ("request throughput (req/s)", _num(report["request_throughput"])),
        ("input token throughput (tok/s)", _num(report["input_token_throughput"], "{:.1f}")),
        ("output token throughput (tok/s)", _num(report["output_token_throughput"], "{:.1f}")),
        ("mean prompt / output tokens", f"{_num(report['mean_prompt_tokens'], '{:.1f}')} / "
                                        f"{_num(report['mean_output_tokens'], '{:.1f}')}"),
    ]
    if "slo_attainment" in report:
        rows += [("SLO attainment", f"{report['slo_attainment'] * 100:.1f}%"),
                 ("goodput (req/s)", _num(report["goodput"]))]
    if report.get("max_rate_at_90") is not None or "sweep" in report:
        rows.append(("max rate at 90% SLO (req/s)", _num(report.get("max_rate_at_90"))))
    for name, value in rows:
        summary.add_row(name, value)
    latency = Table(title="latency (ms)")
    latency.add_column("metric")
    for key in STAT_KEYS:
        latency.add_column(key, justify="right")
    for key in LATENCY_KEYS:
        stats = report[key]
        latency.add_row(key.removesuffix("_s").upper(), *(_ms(stats[k]) for k in STAT_KEYS))
    parts = [summary, latency]
    if report.get("sweep"):
        sweep = Table(title="rate sweep")
        for col in ("rate", "attainment", "goodput", "req/s", "p90 TTFT ms", "p90 TPOT ms"):
            sweep.add_column(col, justify="right")
        for e in report["sweep"]:
            sweep.add_row(_num(e["rate"]), f"{(e.get('slo_attainment') or 0) * 100:.1f}%",
                          _num(e.get("goodput")), _num(e["request_throughput"]),
                          _ms(e["ttft_s"]["p90"]), _ms(e["tpot_s"]["p90"]))
        parts.append(sweep)
    return Group(*parts)


def print_report(report: Mapping[str, Any], console=None) -> None:
    from rich.console import Console

    (console or Console()).print(render_table(report))


# ---------------------------------------------------------------- plots (matplotlib, Agg, no pyplot)


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_latency_cdfs(runs: Mapping[str, Sequence[RequestRecord]], path: str | Path,
                      slo: Slo | None = None) -> Path:
    """CDFs of TTFT, TPOT and E2E (one panel each, one line per run label) to a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _new_figure(13, 4)
    axes = fig.subplots(1, 3)
    getters = (("TTFT", lambda r: r.ttft_s, slo.ttft_s if slo else None),
               ("TPOT", lambda r: r.tpot_s, slo.tpot_s if slo else None),
               ("E2E", lambda r: r.e2e_s, None))
    for ax, (name, get, limit_s) in zip(axes, getters):
        for label, records in runs.items():
            values = np.sort([v for v in (get(r) for r in records if r.ok) if v is not None])
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
        if limit_s is not None and math.isfinite(limit_s):
            ax.axvline(limit_s, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(f"{name} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def plot_sweep(sweep: Sequence[Mapping[str, Any]], path: str | Path, attainment: float = 0.9) -> Path:
    """SLO attainment (and goodput) vs request rate to a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = sorted(sweep, key=lambda e: e["rate"])
    rates = [e["rate"] for e in entries]
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    ax.plot(rates, [(e.get("slo_attainment") or 0.0) * 100 for e in entries], marker="o",
            label="SLO attainment")
    ax.axhline(attainment * 100, color="red", linestyle="--", linewidth=1, label=f"{attainment:.0%}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(rates, [e.get("goodput") or 0.0 for e in entries], marker="s", color="tab:green",
              label="goodput")
    twin.set_ylabel("goodput (req/s)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="lower left")
    fig.savefig(path, dpi=100)
    return path
