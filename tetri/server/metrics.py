"""Prometheus metrics of the front end, named after vLLM's under a `tetri:` prefix.

Each `Metrics` owns its `CollectorRegistry` (no process globals), so tests can build many
apps. Request-level series are fed by `Generation`; KV-transfer series by the engine client
(`observe_kv_transfer`); the per-worker gauges are refreshed from `engine.workers()` rows at
scrape time (`render`), and so are the per-worker prefix-cache counters (vLLM's
`prefix_cache_queries` / `prefix_cache_hits`, in tokens; of the hits, `host_prefix_cache_hits`
from the host tier, with its `kv_offloaded_blocks` / `kv_uploaded_blocks`), which the workers
count themselves. The KV swap's (`--swap-space`) per worker: `tetri:num_preemptions_total`
(vLLM's name) with a `mode` label (swap | recompute), `tetri:num_requests_swapped` (vLLM's gauge),
`tetri:kv_swapped_out_blocks` / `tetri:kv_swapped_in_blocks` and `tetri:kv_swap_held_blocks`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
_TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WORKER_LABELS = ("worker", "role")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The front end's metric families, registered on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("tetri:time_to_first_token_seconds", "Time to first token (from arrival).", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tetri:time_per_output_token_seconds", "Per-request mean time per output token after the first.", buckets=_TOKEN_BUCKETS, registry=r)
        self.itl = Histogram("tetri:inter_token_latency_seconds", "Latency between consecutive output tokens.", buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("tetri:e2e_request_latency_seconds", "End-to-end request latency.", buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("tetri:request_queue_time_seconds", "Time from submit to the first prefill chunk.", buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_transfer = Histogram("tetri:kv_transfer_seconds", "Duration of one prefill->decode KV handoff copy.", buckets=_TRANSFER_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tetri:prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter("tetri:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter("tetri:request_success", "Finished choices by finish reason.", ["finished_reason"], registry=r)
        self.kv_handoffs = Counter("tetri:kv_handoffs", "Prefill->decode KV handoffs completed.", registry=r)
        self.kv_transfer_bytes = Counter("tetri:kv_transfer_bytes", "Bytes of KV copied between workers.", registry=r)
        self.kv_path_bytes = Counter("tetri:kv_transfer_path_bytes", "Bytes of KV copied between workers, by transfer path.", ["path"], registry=r)
        self.kv_path = Gauge("tetri:kv_transfer_path_info", "1 for the KV transfer path each (source, destination) worker pair uses.", ["src_worker", "dst_worker", "path"], registry=r)
        self.migrated = Counter("tetri:requests_migrated", "Requests resumed on another worker after a worker died.", registry=r)
        self.restarts = Counter("tetri:worker_restarts", "Worker processes restarted by the supervisor.", registry=r)
        self.role_changes = Counter("tetri:role_changes", "Worker role changes begun by the role policy "
                                    "(--mode auto) or the instance flip (--flip), by reason.",
                                    ["from_role", "to_role", "reason"], registry=r)
        self.grammar_compile = Histogram("tetri:grammar_compile_seconds", "Time to compile a request's grammar (the front's check, xgrammar).", buckets=_COMPILE_BUCKETS, registry=r)
        self.grammar_cache = Counter("tetri:grammar_cache_requests", "Structured-output requests by whether their grammar was already compiled.", ["result"], registry=r)
        self.send_failures = Counter("tetri:worker_send_failures", "Control messages to workers not sent at once, by reason "
                                     "(deferred: queued behind a full socket, error: retried, dead_worker: discarded "
                                     "with a dead worker's queue).", ["reason"], registry=r)
        self.kv_usage = Gauge("tetri:kv_cache_usage_perc", "KV-cache usage per worker (1 = full).", _WORKER_LABELS, registry=r)
        self.running = Gauge("tetri:num_requests_running", "Requests running per worker.", _WORKER_LABELS, registry=r)
        self.waiting = Gauge("tetri:num_requests_waiting", "Requests waiting per worker.", _WORKER_LABELS, registry=r)
        self._cache_rows: list[dict] = []
        r.register(_PrefixCacheCounters(self))
        r.register(_SwapCounters(self))

    # -- fed by Generation ---------------------------------------------------------------

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int) -> None:
        """`num_tokens` arrived together after `seconds`: that many gaps of seconds/num_tokens."""
        gap = seconds / num_tokens
        for _ in range(min(num_tokens, 64)):
            self.itl.observe(gap)

    def observe_request(
        self,
        *,
        e2e_s: float,
        ttft_s: float | None,
        last_token_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        max_choice_tokens: int,
        reasons: Iterable[str],
    ) -> None:
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft_s is not None and last_token_s is not None and max_choice_tokens > 1:
            self.tpot.observe((last_token_s - ttft_s) / (max_choice_tokens - 1))
        for reason in reasons:
            self.request_success.labels(finished_reason=reason).inc()

    # -- fed by the grammar check ---------------------------------------------------------

    def observe_grammar_compile(self, seconds: float) -> None:
        self.grammar_compile.observe(seconds)

    def observe_grammar_cache(self, hit: bool) -> None:
        self.grammar_cache.labels(result="hit" if hit else "miss").inc()

    # -- fed by the engine client --------------------------------------------------------

    def observe_kv_transfer(self, num_bytes: int, seconds: float, path: str = "") -> None:
        """One completed prefill->decode KV handoff."""
        self.kv_handoffs.inc()
        self.kv_transfer_bytes.inc(num_bytes)
        self.kv_transfer.observe(seconds)
        if path:
            self.kv_path_bytes.labels(path=path).inc(num_bytes)

    def observe_kv_paths(self, dst_worker: int, paths: dict[int, str]) -> None:
        """The transfer path a decode worker opened to each peer pool (replacing what it had)."""
        for labels in [m.labels for m in self.kv_path.collect()[0].samples if m.labels.get("dst_worker") == str(dst_worker)]:
            self.kv_path.remove(labels["src_worker"], labels["dst_worker"], labels["path"])
        for src, path in paths.items():
            self.kv_path.labels(src_worker=str(src), dst_worker=str(dst_worker), path=path).set(1)

    def observe_migrations(self, count: int) -> None:
        self.migrated.inc(count)

    def observe_role_change(self, from_role: str, to_role: str, reason: str) -> None:
        self.role_changes.labels(from_role=from_role, to_role=to_role, reason=reason).inc()

    def observe_restart(self) -> None:
        self.restarts.inc()

    def observe_send_failure(self, reason: str, count: int = 1) -> None:
        self.send_failures.labels(reason=reason).inc(count)

    # -- scrape --------------------------------------------------------------------------

    def set_workers(self, rows: Iterable[dict]) -> None:
        """Refresh the per-worker gauges (stale workers disappear)."""
        for gauge in (self.kv_usage, self.running, self.waiting):
            gauge.clear()
        rows = list(rows)
        self._cache_rows = rows
        for row in rows:
            labels = (str(row.get("worker_id", "?")), str(row.get("role", "?")))
            total = row.get("kv_blocks_total") or 0
            used = row.get("kv_blocks_used") or 0
            self.kv_usage.labels(*labels).set(used / total if total else 0.0)
            self.running.labels(*labels).set(row.get("running") or 0)
            self.waiting.labels(*labels).set(row.get("waiting") or 0)

    def render(self, worker_rows: Iterable[dict] = ()) -> bytes:
        self.set_workers(worker_rows)
        return generate_latest(self.registry)


class _PrefixCacheCounters:
    """`tetri:prefix_cache_queries` / `tetri:prefix_cache_hits` per worker, and per decode
    worker `tetri:handoff_blocks_copied` / `tetri:handoff_blocks_cached`: counters the workers
    keep (on the load board), exposed as of the last scrape's rows."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        queries = CounterMetricFamily("tetri:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels=_WORKER_LABELS)
        hits = CounterMetricFamily("tetri:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   labels=_WORKER_LABELS)
        host = {name: CounterMetricFamily(f"tetri:{name}", doc, labels=_WORKER_LABELS) for name, doc in _HOST_TIER}
        copied = CounterMetricFamily("tetri:handoff_blocks_copied", "Decode workers: prompt KV blocks copied in "
                                     "from prefill workers.", labels=_WORKER_LABELS)
        cached = CounterMetricFamily("tetri:handoff_blocks_cached", "Decode workers: prompt KV blocks of handoffs "
                                     "attached from their own prefix cache instead of copied.", labels=_WORKER_LABELS)
        for row in self.metrics._cache_rows:
            labels = [str(row.get("worker_id", "?")), str(row.get("role", "?"))]
            queries.add_metric(labels, row.get("prefix_cache_queries") or 0)
            hits.add_metric(labels, row.get("prefix_cache_hits") or 0)
            for name, family in host.items():
                family.add_metric(labels, row.get(name) or 0)
            if row.get("role") in ("decode", "mixed"):  # mixed: its handoffs in --mode auto
                copied.add_metric(labels, row.get("handoff_blocks_copied") or 0)
                cached.add_metric(labels, row.get("handoff_blocks_cached") or 0)
        yield from (queries, hits, *host.values(), copied, cached)


_HOST_TIER = (("host_prefix_cache_hits", "Of the prefix cache hits, prompt tokens found in the host tier."),
              ("kv_offloaded_blocks", "Cached KV blocks copied to the host tier on eviction."),
              ("kv_uploaded_blocks", "Host-tier KV blocks copied back to the GPU pool for a hit."))


class _SwapCounters:
    """The KV swap's per-worker series (issue 19 item 5), from the last scrape's worker rows."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        preempt = CounterMetricFamily("tetri:num_preemptions", "Preempted requests, by what happened to their KV "
                                      "(swap: to the host; recompute: freed, re-prefilled).",
                                      labels=(*_WORKER_LABELS, "mode"))
        out = CounterMetricFamily("tetri:kv_swapped_out_blocks", "KV blocks of preempted requests copied to the host.",
                                  labels=_WORKER_LABELS)
        back = CounterMetricFamily("tetri:kv_swapped_in_blocks", "Swapped-out KV blocks copied back into the pool.",
                                   labels=_WORKER_LABELS)
        swapped = GaugeMetricFamily("tetri:num_requests_swapped", "Sequences swapped out to the host now.",
                                    labels=_WORKER_LABELS)
        held = GaugeMetricFamily("tetri:kv_swap_held_blocks", "Host blocks swapped-out sequences hold now.",
                                 labels=_WORKER_LABELS)
        for row in self.metrics._cache_rows:
            labels = [str(row.get("worker_id", "?")), str(row.get("role", "?"))]
            preempt.add_metric([*labels, "swap"], row.get("preemptions_swap") or 0)
            preempt.add_metric([*labels, "recompute"], row.get("preemptions_recompute") or 0)
            out.add_metric(labels, row.get("kv_swapped_out_blocks") or 0)
            back.add_metric(labels, row.get("kv_swapped_in_blocks") or 0)
            swapped.add_metric(labels, row.get("swapped_reqs") or 0)
            held.add_metric(labels, row.get("swap_held_blocks") or 0)
        yield from (preempt, out, back, swapped, held)
